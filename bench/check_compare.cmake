# ctest checks of moet-compare (bench/CMakeLists.txt):
#   cmake -DEXE=<moet-compare> -DMODE=help -P check_compare.cmake
#     --help exits 0 and explains the flags, the shapes, the columns and every gate key.
#   cmake -DEXE=<moet-compare> -DMODE=json -DJSON=<file> -P check_compare.cmake
#     the JSON a smoke run wrote: an object with meta (commit, CPU, ISA, compiler, OpenBLAS
#     kernels, seed, repeat) and results whose integers are printed as integers.
if(MODE STREQUAL "help")
  execute_process(COMMAND "${EXE}" --help RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err)
  if(NOT rc EQUAL 0)
    message(FATAL_ERROR "moet-compare --help exited ${rc}: ${err}")
  endif()
  foreach(needle "--shape" "--gates" "--weights" "--no-flush" "--json" "S1  d_model 512"
          "S2  d_model 1024, d_ff 3584" "S3  d_model 1024, d_ff 512, 64" "ms min/med/max" "vs_ceil"
          "roof" "t/top2 (<=)" "'!'" "top_k  " "  renorm=0 " "  p=0.4 " "  initial=0 "
          "  period=300 " "  norm=max " "  inference=token ")
    string(FIND "${out}" "${needle}" at)
    if(at EQUAL -1)
      message(FATAL_ERROR "moet-compare --help does not mention '${needle}'")
    endif()
  endforeach()
elseif(MODE STREQUAL "json")
  file(READ "${JSON}" doc)
  foreach(key commit cpu_model kernel_isa compiler cxx_flags openblas_core seed repeat shape)
    string(JSON value ERROR_VARIABLE error GET "${doc}" meta ${key})
    if(error)
      message(FATAL_ERROR "${JSON}: meta.${key}: ${error}")
    endif()
  endforeach()
  string(JSON n LENGTH "${doc}" results)
  if(n LESS 1)
    message(FATAL_ERROR "${JSON}: no results")
  endif()
  string(JSON gate GET "${doc}" results 0 gate)
  string(JSON ms GET "${doc}" results 0 ms_median)
  # Integers exactly (no 1.7e+01, no 17.0), e.g. "tokens": 17 and "seed": 42.
  string(REGEX MATCH "\"tokens\": [0-9]+,\n" int_tokens "${doc}")
  string(REGEX MATCH "\"seed\": [0-9]+,\n" int_seed "${doc}")
  if(int_tokens STREQUAL "" OR int_seed STREQUAL "")
    message(FATAL_ERROR "${JSON}: tokens or seed not printed as an integer")
  endif()
else()
  message(FATAL_ERROR "MODE must be help or json")
endif()
