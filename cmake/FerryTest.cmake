# ferry_add_gtest(NAME SOURCES a.cc b.cc LIBS lib... LABELS unit|integration|slow [TIMEOUT s])
# Registers a GoogleTest binary with ctest. Unit tests live next to the code they test.
function(ferry_add_gtest name)
  cmake_parse_arguments(T "" "TIMEOUT" "SOURCES;LIBS;LABELS" ${ARGN})
  add_executable(${name} ${T_SOURCES})
  target_link_libraries(${name} PRIVATE ${T_LIBS} GTest::gtest GTest::gtest_main GTest::gmock)
  set_target_properties(${name} PROPERTIES RUNTIME_OUTPUT_DIRECTORY ${CMAKE_BINARY_DIR}/tests)
  if(NOT T_LABELS)
    set(T_LABELS unit)
  endif()
  if(NOT T_TIMEOUT)
    set(T_TIMEOUT 300)
  endif()
  add_test(NAME ${name} COMMAND ${name})
  # A GTEST_SKIP anywhere in the binary shows in ctest's summary as "Skipped" (not as passed);
  # scripts/ctest-run with FERRY_FAIL_ON_SKIP=1 (CI) then fails the run.
  set_tests_properties(${name} PROPERTIES LABELS "${T_LABELS}" TIMEOUT ${T_TIMEOUT}
    SKIP_REGULAR_EXPRESSION "\\[  SKIPPED \\]"
    ENVIRONMENT "FERRY_SOURCE_DIR=${CMAKE_SOURCE_DIR};FERRY_BUILD_DIR=${CMAKE_BINARY_DIR}")
endfunction()

# Glob the sources of a component (helpers own their directories; globbing keeps
# the top-level CMake free of per-file edits).
macro(ferry_glob_sources var dir)
  file(GLOB_RECURSE ${var} CONFIGURE_DEPENDS ${dir}/*.cc)
  list(FILTER ${var} EXCLUDE REGEX ".*_test\\.cc$")
endmacro()
macro(ferry_glob_tests var dir)
  file(GLOB_RECURSE ${var} CONFIGURE_DEPENDS ${dir}/*_test.cc)
endmacro()
