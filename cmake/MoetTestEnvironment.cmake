# moet_tests_wait_passively(): every test defined so far in the calling directory gets
# OMP_WAIT_POLICY=passive (appended to its ENVIRONMENT).
#
# ctest -j N runs N tests at once, each with as many OpenMP threads as the machine has cores:
# with the runtimes' default policy a thread that waits at a barrier spins (libgomp, and libomp
# for 200 ms), so the oversubscribed threads of two tests burn the cores their partners need.
# Measured on this project's 2-core VM: the unit tests (label `unit`, plain Release) take 69 s
# with `ctest -j 2` and the default policy, 18 s with `-j 1`, and 10 s with `-j 2` and passive
# waits.
# Passive waits change no result (the tests' thread counts and work split are the same).
function(moet_tests_wait_passively)
  get_property(_tests DIRECTORY PROPERTY TESTS)
  if(_tests)
    set_property(TEST ${_tests} APPEND PROPERTY ENVIRONMENT "OMP_WAIT_POLICY=passive")
  endif()
endfunction()
