# KV block wire format (issue 5): codec, conversions, hostile input, end-to-end import.
kvr_unit_test(test_kv_wire SOURCES ${CMAKE_CURRENT_SOURCE_DIR}/unit/test_kv_wire.c TIMEOUT 60 LABELS unit kvwire)
# The benchmark's JSON and the ratios it reports on the bundled model (runs build/bin/kvrelay).
kvr_unit_test(test_bench_kvwire SOURCES ${CMAKE_CURRENT_SOURCE_DIR}/unit/test_bench_kvwire.c TIMEOUT 120 LABELS kvwire bench)

# libFuzzer harness for the decoder: only with -DKVR_FUZZ=ON and clang (scripts/fuzz.sh
# configures both, with ASan+UBSan, and runs it for a bounded time).
if(KVR_FUZZ)
  if(NOT CMAKE_C_COMPILER_ID MATCHES "Clang")
    message(FATAL_ERROR "KVR_FUZZ=ON needs clang (CC=clang): libFuzzer is clang's")
  endif()
  # Coverage feedback from the library code under test, not only from the harness.
  target_compile_options(kvr_common PRIVATE -fsanitize=fuzzer-no-link)
  add_executable(fuzz_kv_wire ${CMAKE_CURRENT_SOURCE_DIR}/fuzz/fuzz_kv_wire.c)
  target_compile_options(fuzz_kv_wire PRIVATE -fsanitize=fuzzer,address,undefined)
  target_link_options(fuzz_kv_wire PRIVATE -fsanitize=fuzzer,address,undefined)
  target_link_libraries(fuzz_kv_wire PRIVATE kvr_common)
  add_executable(fuzz_kv_wire_seeds ${CMAKE_CURRENT_SOURCE_DIR}/fuzz/fuzz_kv_wire_seeds.c)
  target_link_libraries(fuzz_kv_wire_seeds PRIVATE kvr_common)
  # The MPI message parsers (issue 15), the same way.
  add_executable(fuzz_msg ${CMAKE_CURRENT_SOURCE_DIR}/fuzz/fuzz_msg.c)
  target_compile_options(fuzz_msg PRIVATE -fsanitize=fuzzer,address,undefined)
  target_link_options(fuzz_msg PRIVATE -fsanitize=fuzzer,address,undefined)
  target_link_libraries(fuzz_msg PRIVATE kvr_common)
  add_executable(fuzz_msg_seeds ${CMAKE_CURRENT_SOURCE_DIR}/fuzz/fuzz_msg_seeds.c)
  target_link_libraries(fuzz_msg_seeds PRIVATE kvr_common)
  set_target_properties(fuzz_kv_wire fuzz_kv_wire_seeds fuzz_msg fuzz_msg_seeds
                        PROPERTIES RUNTIME_OUTPUT_DIRECTORY ${KVR_TEST_BIN_DIR})
  # A short, count-bounded run on fresh seeds so a fuzz build's ctest exercises it too;
  # the long runs are scripts/fuzz.sh's.
  add_test(NAME fuzz_kv_wire_smoke
           COMMAND sh -c "d=$(mktemp -d) && \"$1\" \"$d\" >/dev/null && \"$2\" -runs=20000 -max_len=40000 \"$d\"; rc=$?; rm -rf \"$d\"; exit $rc"
                   sh $<TARGET_FILE:fuzz_kv_wire_seeds> $<TARGET_FILE:fuzz_kv_wire>)
  set_tests_properties(fuzz_kv_wire_smoke PROPERTIES TIMEOUT 300 LABELS "fuzz;kvwire")
  add_test(NAME fuzz_msg_smoke
           COMMAND sh -c "d=$(mktemp -d) && \"$1\" \"$d\" >/dev/null && \"$2\" -runs=50000 -max_len=4096 \"$d\"; rc=$?; rm -rf \"$d\"; exit $rc"
                   sh $<TARGET_FILE:fuzz_msg_seeds> $<TARGET_FILE:fuzz_msg>)
  set_tests_properties(fuzz_msg_smoke PROPERTIES TIMEOUT 300 LABELS "fuzz;protocol")
endif()

# MPI message writers and parsers (issue 15): round trips, truncation, hostile fields.
kvr_unit_test(test_msg SOURCES ${CMAKE_CURRENT_SOURCE_DIR}/unit/test_msg.c TIMEOUT 60 LABELS unit protocol)

# `kvrelay bench engine --json` (issue 13): its numbers recomputed from its own fields,
# --ceilings-only, a bad --models list (system python3; runs build/bin/kvrelay).
add_test(NAME test_bench_engine
  COMMAND /usr/bin/python3 ${CMAKE_CURRENT_SOURCE_DIR}/e2e/test_bench_engine.py ${CMAKE_BINARY_DIR}/bin ${KVR_SHARED_DIR})
set_tests_properties(test_bench_engine PROPERTIES TIMEOUT 300 LABELS "bench;kernels" RUN_SERIAL TRUE)
