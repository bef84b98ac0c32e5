# Tests of GGUF models and the weight types (issue 12): the types' kernels against a
# double-precision reference, the GGUF reader and loader (real files, hostile files),
# the tokenizer from GGUF metadata, and the bundled GGUF files end to end against the
# llama2.c golden runs and llama.cpp's own outputs.
set(KVR_GGUF_TEST_DIR ${CMAKE_CURRENT_SOURCE_DIR})

kvr_unit_test(test_quant
  SOURCES ${KVR_GGUF_TEST_DIR}/unit/test_quant.c ${KVR_GGUF_TEST_DIR}/unit/ref_forward.c
  TIMEOUT 120 LABELS gguf)

kvr_unit_test(test_gguf
  SOURCES ${KVR_GGUF_TEST_DIR}/unit/test_gguf.c ${KVR_GGUF_TEST_DIR}/unit/gguf_edit.c
  TIMEOUT 180 LABELS gguf)

kvr_unit_test(test_gguf_vocab
  SOURCES ${KVR_GGUF_TEST_DIR}/unit/test_gguf_vocab.c ${KVR_GGUF_TEST_DIR}/unit/gguf_edit.c
          ${KVR_GGUF_TEST_DIR}/unit/golden.c
  TIMEOUT 120 LABELS gguf)

# End to end: the product binary must exist before this runs.
kvr_unit_test(test_cli_gguf
  SOURCES ${KVR_GGUF_TEST_DIR}/e2e/test_cli_gguf.c ${KVR_GGUF_TEST_DIR}/e2e/run_cmd.c
          ${KVR_GGUF_TEST_DIR}/unit/golden.c ${KVR_GGUF_TEST_DIR}/unit/gguf_edit.c
  TIMEOUT 300 LABELS gguf e2e)
target_include_directories(test_cli_gguf PRIVATE ${KVR_GGUF_TEST_DIR}/e2e)
add_dependencies(test_cli_gguf kvrelay)

# The cluster suite (tests/cluster.cmake) once more, serving the Q8_0 GGUF file with its
# own tokenizer at --context 512; answers must equal `kvrelay generate`'s on that file.
# mismatch: processes that disagree on the file or --context make up exit 1 at once.
# In a sanitizer build only golden (GGUF-loading ranks under 16 concurrent requests, each
# leak-checked at exit) and mismatch (the refusal path): memory, timeout, faults and
# colocated exercise model-independent router code that the llama2.c scenarios already
# run under the sanitizers, and would add about 80 s to scripts/test.sh.
set(KVR_GGUF_CLUSTER_SCENARIOS golden memory timeout faults colocated mismatch)
if(KVR_SANITIZE)
  set(KVR_GGUF_CLUSTER_SCENARIOS golden mismatch)
endif()
foreach(scenario ${KVR_GGUF_CLUSTER_SCENARIOS})
  add_test(NAME test_cluster_gguf_${scenario} COMMAND test_cluster_golden ${scenario} gguf=q8_0)
  set_tests_properties(test_cluster_gguf_${scenario} PROPERTIES TIMEOUT 240 LABELS "cluster;gguf" RUN_SERIAL TRUE
    ENVIRONMENT "OMPI_ALLOW_RUN_AS_ROOT=1;OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1;OMPI_MCA_rmaps_base_oversubscribe=1")
endforeach()

# libFuzzer harness for the GGUF reader and loader: only with -DKVR_FUZZ=ON and clang
# (scripts/fuzz.sh configures both, with ASan+UBSan, and runs it for a bounded time;
# tests/kvwire.cmake instruments kvr_common for coverage).
if(KVR_FUZZ)
  add_executable(fuzz_gguf ${KVR_GGUF_TEST_DIR}/fuzz/fuzz_gguf.c)
  target_compile_options(fuzz_gguf PRIVATE -fsanitize=fuzzer,address,undefined)
  target_link_options(fuzz_gguf PRIVATE -fsanitize=fuzzer,address,undefined)
  target_link_libraries(fuzz_gguf PRIVATE kvr_common)
  add_executable(fuzz_gguf_seeds ${KVR_GGUF_TEST_DIR}/fuzz/fuzz_gguf_seeds.c ${KVR_GGUF_TEST_DIR}/unit/gguf_edit.c)
  target_include_directories(fuzz_gguf_seeds PRIVATE ${KVR_GGUF_TEST_DIR}/unit)
  target_compile_definitions(fuzz_gguf_seeds PRIVATE KVR_SHARED_DIR="${KVR_SHARED_DIR}")
  target_link_libraries(fuzz_gguf_seeds PRIVATE kvr_common)
  set_target_properties(fuzz_gguf fuzz_gguf_seeds PROPERTIES RUNTIME_OUTPUT_DIRECTORY ${KVR_TEST_BIN_DIR})
  add_test(NAME fuzz_gguf_smoke
           COMMAND sh -c "d=$(mktemp -d) && \"$1\" \"$d\" >/dev/null 2>&1 && \"$2\" -runs=5000 -max_len=65536 \"$d\"; rc=$?; rm -rf \"$d\"; exit $rc"
                   sh $<TARGET_FILE:fuzz_gguf_seeds> $<TARGET_FILE:fuzz_gguf>)
  set_tests_properties(fuzz_gguf_smoke PROPERTIES TIMEOUT 300 LABELS "fuzz;gguf")
endif()
