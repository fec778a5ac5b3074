# Layering check: moet's headers include downwards only.
#
#   cmake -DMOET_INCLUDE_DIR=<dir containing moet/> [-DMOET_LAYERING_STAMP=<file>] \
#         -P cmake/MoetLayering.cmake
#
# Every header under <dir>/moet (.hpp and .inl) gets a layer from the table below, lowest first;
# a header may include headers of its own layer or lower ones, never higher ones, and a gate
# never includes an expert bank or the other way round (both are layer 3). A violation prints
# the file, the include and both layers, and the script fails; a header the table does not
# place fails too, so a new folder gets a layer when it is created. Run by the build (target
# moet_layering_check, part of `all` when tests are built) and by ctest (test
# moet_layering_check_catches, which runs it on tests/layering_violation and expects the
# message). With MOET_LAYERING_STAMP the script writes that file when the check passes.
#
# Layer table (the path relative to include/, as a regular expression on the whole path):
#   0 foundation        version config errors tensor kernel_isa; detail/ buffer parallel rng
#                       bf16 quant select
#   1 core protocol     routing context stats concepts activations weight_format
#   2 detail kernels    instantiate_kernels; detail/ gemm kernels/* gather_scatter softmax_router
#                       expert_bank bank_store grad_stacks weights transposed_packs param_names
#   3 experts, gates    experts/*, gates/* (neither includes the other)
#   4 dispatch          dispatch/*
#   5 layer             layer.hpp
#   6 train, io, mpi    train/*, io/*, mpi/*
#   7 umbrella, testing moet.hpp, testing/*

set(_moet_layer_names
  "foundation" "core protocol" "detail kernels" "experts and gates" "dispatch" "layer"
  "train, io and mpi" "umbrella and testing")
set(_moet_layer_0
  "moet/(version|config|errors|tensor|kernel_isa)\\.hpp"
  "moet/detail/(buffer|parallel|rng|bf16|quant|select)\\.hpp")
set(_moet_layer_1 "moet/(routing|context|stats|concepts|activations|weight_format)\\.hpp")
set(_moet_layer_2
  "moet/instantiate_kernels\\.hpp"
  "moet/detail/(gemm|gather_scatter|softmax_router|expert_bank|bank_store|grad_stacks|weights|transposed_packs|param_names)\\.hpp"
  "moet/detail/kernels/[a-z0-9_]+\\.(hpp|inl)")
set(_moet_layer_3 "moet/experts/[a-z0-9_]+\\.hpp" "moet/gates/[a-z0-9_]+\\.hpp")
set(_moet_layer_4 "moet/dispatch/[a-z0-9_]+\\.hpp")
set(_moet_layer_5 "moet/layer\\.hpp")
set(_moet_layer_6 "moet/train/[a-z0-9_]+\\.hpp" "moet/io/[a-z0-9_]+\\.hpp"
  "moet/mpi/[a-z0-9_]+\\.hpp")
set(_moet_layer_7 "moet/moet\\.hpp" "moet/testing/[a-z0-9_]+\\.hpp")

# Sets ${out} to the layer of header path ${path} (moet/...), or -1 when the table has none.
function(_moet_layer_of path out)
  foreach(_layer RANGE 7)
    foreach(_regex IN LISTS _moet_layer_${_layer})
      if(path MATCHES "^${_regex}$")
        set(${out} ${_layer} PARENT_SCOPE)
        return()
      endif()
    endforeach()
  endforeach()
  set(${out} -1 PARENT_SCOPE)
endfunction()

if(NOT MOET_INCLUDE_DIR)
  message(FATAL_ERROR "MoetLayering.cmake: pass -DMOET_INCLUDE_DIR=<dir containing moet/>")
endif()

get_filename_component(MOET_INCLUDE_DIR "${MOET_INCLUDE_DIR}" ABSOLUTE)
file(GLOB_RECURSE _headers RELATIVE "${MOET_INCLUDE_DIR}"
  "${MOET_INCLUDE_DIR}/moet/*.hpp" "${MOET_INCLUDE_DIR}/moet/*.inl")
list(SORT _headers)
if(NOT _headers)
  message(FATAL_ERROR "moet layering: no headers under ${MOET_INCLUDE_DIR}/moet")
endif()
set(_violations 0)
foreach(_header IN LISTS _headers)
  _moet_layer_of("${_header}" _from)
  if(_from EQUAL -1)
    message(SEND_ERROR "moet layering: ${_header} has no layer in cmake/MoetLayering.cmake's "
                       "table: add it there")
    math(EXPR _violations "${_violations} + 1")
    continue()
  endif()
  list(GET _moet_layer_names ${_from} _from_name)
  file(STRINGS "${MOET_INCLUDE_DIR}/${_header}" _includes
       REGEX "^[ \t]*#[ \t]*include[ \t]*[\"<]moet/[^\">]+[\">]")
  foreach(_line IN LISTS _includes)
    string(REGEX REPLACE "^[ \t]*#[ \t]*include[ \t]*[\"<](moet/[^\">]+)[\">].*$" "\\1" _target
                         "${_line}")
    _moet_layer_of("${_target}" _to)
    if(_to EQUAL -1)
      message(SEND_ERROR "moet layering: ${_header} includes ${_target}, which has no layer in "
                         "cmake/MoetLayering.cmake's table")
      math(EXPR _violations "${_violations} + 1")
      continue()
    endif()
    list(GET _moet_layer_names ${_to} _to_name)
    if(_to GREATER _from)
      message(SEND_ERROR "moet layering: ${_header} (layer ${_from}, ${_from_name}) includes "
                         "${_target} (layer ${_to}, ${_to_name}): headers include downwards only")
      math(EXPR _violations "${_violations} + 1")
    elseif((_header MATCHES "^moet/gates/" AND _target MATCHES "^moet/experts/") OR
           (_header MATCHES "^moet/experts/" AND _target MATCHES "^moet/gates/"))
      message(SEND_ERROR "moet layering: ${_header} (layer ${_from}, ${_from_name}) includes "
                         "${_target} (layer ${_to}, ${_to_name}): gates and expert banks do not "
                         "include each other")
      math(EXPR _violations "${_violations} + 1")
    endif()
  endforeach()
endforeach()

list(LENGTH _headers _count)
if(_violations GREATER 0)
  message(FATAL_ERROR "moet layering: ${_violations} violation(s) in ${_count} headers")
endif()
message(STATUS "moet layering: ${_count} headers include downwards only")
if(MOET_LAYERING_STAMP)
  file(WRITE "${MOET_LAYERING_STAMP}" "${_count} headers checked\n")
endif()
