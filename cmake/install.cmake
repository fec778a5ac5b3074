# Install and export rules for moet (included from the top-level CMakeLists.txt when
# MOET_INSTALL is ON).
#
#   <prefix>/include/moet/...                      the headers
#   <prefix>/share/cmake/moet/moetConfig.cmake     find_package(moet) entry point
#   <prefix>/share/cmake/moet/moetConfigVersion.cmake
#   <prefix>/share/cmake/moet/moetTargets.cmake    moet::moet, moet::native (, moet::io, moet::mpi)
#
# moet is header-only, so the package is architecture independent and lives under share/.

include(CMakePackageConfigHelpers)

set(MOET_INSTALL_CMAKEDIR "${CMAKE_INSTALL_DATADIR}/cmake/moet"
    CACHE STRING "Where moet's CMake package files are installed (relative to the prefix)")
mark_as_advanced(MOET_INSTALL_CMAKEDIR)

# The exported names are moet::moet and moet::native (opt-in -march=native for consumers
# that build and run on the same machine).
set_target_properties(moet_native PROPERTIES EXPORT_NAME native)
install(TARGETS moet moet_native EXPORT moetTargets)
if(MOET_HAS_IO)
  set_target_properties(moet_io PROPERTIES EXPORT_NAME io)
  install(TARGETS moet_io EXPORT moetTargets)
endif()
if(MOET_WITH_MPI)
  set_target_properties(moet_mpi PROPERTIES EXPORT_NAME mpi)
  install(TARGETS moet_mpi EXPORT moetTargets)
endif()

install(DIRECTORY "${PROJECT_SOURCE_DIR}/include/"
        DESTINATION "${CMAKE_INSTALL_INCLUDEDIR}"
        FILES_MATCHING PATTERN "*.hpp" PATTERN "*.inl")

install(EXPORT moetTargets
        NAMESPACE moet::
        FILE moetTargets.cmake
        DESTINATION "${MOET_INSTALL_CMAKEDIR}")

configure_package_config_file(
  "${CMAKE_CURRENT_LIST_DIR}/moetConfig.cmake.in"
  "${PROJECT_BINARY_DIR}/moetConfig.cmake"
  INSTALL_DESTINATION "${MOET_INSTALL_CMAKEDIR}"
  NO_SET_AND_CHECK_MACRO)

# Before 1.0 a minor release may break the API, so 0.1 accepts only 0.1.x.
write_basic_package_version_file(
  "${PROJECT_BINARY_DIR}/moetConfigVersion.cmake"
  VERSION "${PROJECT_VERSION}"
  COMPATIBILITY SameMinorVersion
  ARCH_INDEPENDENT)

install(FILES
          "${PROJECT_BINARY_DIR}/moetConfig.cmake"
          "${PROJECT_BINARY_DIR}/moetConfigVersion.cmake"
        DESTINATION "${MOET_INSTALL_CMAKEDIR}")

if(EXISTS "${PROJECT_SOURCE_DIR}/LICENSE")
  install(FILES "${PROJECT_SOURCE_DIR}/LICENSE" DESTINATION "${CMAKE_INSTALL_DATADIR}/doc/moet")
endif()
