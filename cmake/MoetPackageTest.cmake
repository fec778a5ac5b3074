# Packaging checks, run by ctest in script mode:
#
#   cmake -DSTEP=<install|consumer|version> -DWORK_DIR=<dir> [options] -P MoetPackageTest.cmake
#
# STEP=install   configure moet from MOET_SOURCE_DIR into WORK_DIR/build (tests, benchmarks and
#                examples off, install on), build it and install it into PREFIX.
# STEP=consumer  configure the project in PROJECT_DIR into WORK_DIR/build (passing PREFIX as
#                CMAKE_PREFIX_PATH and MOET_SOURCE_DIR), build it and run WORK_DIR/build/<RUN>
#                (RUN: one program or a comma-separated list).
# STEP=version   check the installed version file: 0.<minor> is found, other minors and
#                majors are rejected (SameMinorVersion before 1.0).
#
# Common options: GENERATOR, MAKE_PROGRAM, CXX_COMPILER, BUILD_TYPE, Eigen3_DIR, USE_OPENMP.
# Everything is written below WORK_DIR (inside ctest's build tree), which is wiped first, so
# runs are repeatable and the source tree is never touched. Nothing is downloaded.

cmake_minimum_required(VERSION 3.20)

foreach(_required STEP WORK_DIR)
  if(NOT DEFINED ${_required})
    message(FATAL_ERROR "MoetPackageTest: -D${_required}=... is required")
  endif()
endforeach()

# Runs a command, echoes it, and stops the script with its output if it fails.
function(moet_run)
  string(REPLACE ";" " " _pretty "${ARGN}")
  message(STATUS "[moet package test] ${_pretty}")
  execute_process(COMMAND ${ARGN} RESULT_VARIABLE _rc)
  if(NOT _rc EQUAL 0)
    message(FATAL_ERROR "[moet package test] failed (${_rc}): ${_pretty}")
  endif()
endfunction()

# Arguments shared by every configure: same generator, compiler and Eigen as the outer build.
set(_configure_args "")
if(GENERATOR)
  list(APPEND _configure_args -G "${GENERATOR}")
endif()
if(MAKE_PROGRAM)
  list(APPEND _configure_args "-DCMAKE_MAKE_PROGRAM=${MAKE_PROGRAM}")
endif()
if(CXX_COMPILER)
  list(APPEND _configure_args "-DCMAKE_CXX_COMPILER=${CXX_COMPILER}")
endif()
if(NOT BUILD_TYPE)
  set(BUILD_TYPE Release)
endif()
list(APPEND _configure_args "-DCMAKE_BUILD_TYPE=${BUILD_TYPE}")
if(Eigen3_DIR)
  list(APPEND _configure_args "-DEigen3_DIR=${Eigen3_DIR}")
endif()

set(_build_dir "${WORK_DIR}/build")

if(STEP STREQUAL "install")
  foreach(_required MOET_SOURCE_DIR PREFIX)
    if(NOT DEFINED ${_required})
      message(FATAL_ERROR "MoetPackageTest: STEP=install needs -D${_required}=...")
    endif()
  endforeach()
  file(REMOVE_RECURSE "${_build_dir}" "${PREFIX}")
  set(_moet_args
      -DMOET_BUILD_TESTS=OFF -DMOET_BUILD_BENCHMARKS=OFF -DMOET_BUILD_EXAMPLES=OFF
      -DMOET_INSTALL=ON "-DCMAKE_INSTALL_PREFIX=${PREFIX}")
  if(DEFINED USE_OPENMP)
    list(APPEND _moet_args "-DMOET_USE_OPENMP=${USE_OPENMP}")
  endif()
  moet_run("${CMAKE_COMMAND}" -S "${MOET_SOURCE_DIR}" -B "${_build_dir}" ${_configure_args} ${_moet_args})
  moet_run("${CMAKE_COMMAND}" --build "${_build_dir}" --config "${BUILD_TYPE}")
  moet_run("${CMAKE_COMMAND}" --install "${_build_dir}" --config "${BUILD_TYPE}")
  foreach(_file include/moet/moet.hpp include/moet/version.hpp
                share/cmake/moet/moetConfig.cmake share/cmake/moet/moetConfigVersion.cmake
                share/cmake/moet/moetTargets.cmake)
    if(NOT EXISTS "${PREFIX}/${_file}")
      message(FATAL_ERROR "[moet package test] not installed: ${PREFIX}/${_file}")
    endif()
  endforeach()

elseif(STEP STREQUAL "consumer")
  foreach(_required PROJECT_DIR RUN)
    if(NOT DEFINED ${_required})
      message(FATAL_ERROR "MoetPackageTest: STEP=consumer needs -D${_required}=...")
    endif()
  endforeach()
  file(REMOVE_RECURSE "${_build_dir}")
  set(_consumer_args "")
  if(PREFIX)
    # Only the test prefix: a moet installed elsewhere on the system must not satisfy it.
    list(APPEND _consumer_args "-DCMAKE_PREFIX_PATH=${PREFIX}" "-Dmoet_ROOT=${PREFIX}")
  endif()
  if(MOET_SOURCE_DIR)
    list(APPEND _consumer_args "-DMOET_SOURCE_DIR=${MOET_SOURCE_DIR}")
  endif()
  if(DEFINED USE_OPENMP)
    list(APPEND _consumer_args "-DMOET_USE_OPENMP=${USE_OPENMP}")
  endif()
  moet_run("${CMAKE_COMMAND}" -S "${PROJECT_DIR}" -B "${_build_dir}" ${_configure_args} ${_consumer_args})
  moet_run("${CMAKE_COMMAND}" --build "${_build_dir}" --config "${BUILD_TYPE}")
  # RUN: one program, or several separated by commas, run in that order. Single-config
  # generators put a program in the build dir, multi-config ones below it.
  string(REPLACE "," ";" _runs "${RUN}")
  foreach(_run IN LISTS _runs)
    set(_program "${_build_dir}/${_run}")
    if(NOT EXISTS "${_program}" AND NOT EXISTS "${_program}.exe")
      set(_program "${_build_dir}/${BUILD_TYPE}/${_run}")
    endif()
    moet_run("${_program}")
  endforeach()

elseif(STEP STREQUAL "version")
  if(NOT DEFINED PREFIX OR NOT DEFINED MOET_VERSION)
    message(FATAL_ERROR "MoetPackageTest: STEP=version needs -DPREFIX=... -DMOET_VERSION=...")
  endif()
  # Evaluate the installed version file the way find_package(moet <requested>) does, for
  # requests that must and must not match. CMAKE_SIZEOF_VOID_P pretends to be a 32-bit
  # consumer: only an ARCH_INDEPENDENT version file accepts it.
  set(_version_file "${PREFIX}/share/cmake/moet/moetConfigVersion.cmake")
  if(NOT EXISTS "${_version_file}")
    message(FATAL_ERROR "[moet package test] missing ${_version_file}")
  endif()
  string(REGEX MATCH "^([0-9]+)\\.([0-9]+)" _ "${MOET_VERSION}")
  set(_major "${CMAKE_MATCH_1}")
  set(_minor "${CMAKE_MATCH_2}")
  math(EXPR _next_minor "${_minor} + 1")
  math(EXPR _next_major "${_major} + 1")
  set(_accept "${_major}.${_minor}" "${MOET_VERSION}")
  set(_reject "${_major}.${_next_minor}" "${_next_major}.${_minor}")
  if(_minor GREATER 0)
    math(EXPR _prev_minor "${_minor} - 1")
    list(APPEND _reject "${_major}.${_prev_minor}")  # SameMinorVersion: older minors differ too
  endif()
  set(CMAKE_SIZEOF_VOID_P 4)
  foreach(_requested IN LISTS _accept _reject)
    string(REPLACE "." ";" _req_parts "${_requested}")
    list(LENGTH _req_parts PACKAGE_FIND_VERSION_COUNT)
    list(GET _req_parts 0 PACKAGE_FIND_VERSION_MAJOR)
    list(GET _req_parts 1 PACKAGE_FIND_VERSION_MINOR)
    set(PACKAGE_FIND_VERSION "${_requested}")
    unset(PACKAGE_VERSION_COMPATIBLE)
    unset(PACKAGE_VERSION_UNSUITABLE)
    include("${_version_file}")
    if(PACKAGE_VERSION_UNSUITABLE)
      message(FATAL_ERROR "[moet package test] the version file rejects a 32-bit consumer: "
                          "it must be ARCH_INDEPENDENT (moet is header-only)")
    endif()
    if(_requested IN_LIST _accept)
      set(_expected TRUE)
    else()
      set(_expected FALSE)
    endif()
    if((_expected AND NOT PACKAGE_VERSION_COMPATIBLE) OR
       (NOT _expected AND PACKAGE_VERSION_COMPATIBLE))
      message(FATAL_ERROR "[moet package test] find_package(moet ${_requested}) against "
                          "${PACKAGE_VERSION}: compatible=${PACKAGE_VERSION_COMPATIBLE}, "
                          "expected ${_expected}")
    endif()
    message(STATUS "[moet package test] find_package(moet ${_requested}) against "
                   "${PACKAGE_VERSION}: compatible=${PACKAGE_VERSION_COMPATIBLE} (expected)")
  endforeach()

else()
  message(FATAL_ERROR "MoetPackageTest: unknown STEP '${STEP}'")
endif()
