# Tests of the engine (issue 3): golden teacher forcing, the forward pass against a naive
# reference, tokenizer, sampler, options, thread pool, and `kvrelay generate` end to end.
set(KVR_ENGINE_TEST_DIR ${CMAKE_CURRENT_SOURCE_DIR})

kvr_unit_test(test_transformer
  SOURCES ${KVR_ENGINE_TEST_DIR}/unit/test_transformer.c ${KVR_ENGINE_TEST_DIR}/unit/ref_forward.c
  TIMEOUT 120 LABELS engine)
# The naive reference recomputes every prefix (about 5 GMAC for 200 tokens): it is test
# code checking the engine, not code under test, so it is always optimized and never
# instrumented (sanitizers would make it ~13x slower and the suite minutes longer).
set_source_files_properties(${KVR_ENGINE_TEST_DIR}/unit/ref_forward.c TARGET_DIRECTORY test_transformer
  PROPERTIES COMPILE_OPTIONS "-O3;-fno-sanitize=all")

kvr_unit_test(test_threadpool
  SOURCES ${KVR_ENGINE_TEST_DIR}/unit/test_threadpool.c
  TIMEOUT 120 LABELS engine)

kvr_unit_test(test_golden
  SOURCES ${KVR_ENGINE_TEST_DIR}/unit/test_golden.c ${KVR_ENGINE_TEST_DIR}/unit/golden.c
  TIMEOUT 120 LABELS engine)

# End to end: the product binary must exist before these run.
kvr_unit_test(test_cli_generate
  SOURCES ${KVR_ENGINE_TEST_DIR}/e2e/test_cli_generate.c ${KVR_ENGINE_TEST_DIR}/e2e/run_cmd.c
          ${KVR_ENGINE_TEST_DIR}/unit/golden.c
  TIMEOUT 180 LABELS engine e2e)
target_include_directories(test_cli_generate PRIVATE ${KVR_ENGINE_TEST_DIR}/e2e)
add_dependencies(test_cli_generate kvrelay)

kvr_unit_test(test_cli_errors
  SOURCES ${KVR_ENGINE_TEST_DIR}/e2e/test_cli_errors.c ${KVR_ENGINE_TEST_DIR}/e2e/run_cmd.c
  TIMEOUT 180 LABELS engine e2e)
target_include_directories(test_cli_errors PRIVATE ${KVR_ENGINE_TEST_DIR}/e2e)
add_dependencies(test_cli_errors kvrelay)

kvr_unit_test(test_tokenizer
  SOURCES ${KVR_ENGINE_TEST_DIR}/unit/test_tokenizer.c ${KVR_ENGINE_TEST_DIR}/unit/golden.c
  TIMEOUT 120 LABELS engine)

kvr_unit_test(test_sampler
  SOURCES ${KVR_ENGINE_TEST_DIR}/unit/test_sampler.c
  TIMEOUT 60 LABELS engine)

kvr_unit_test(test_options
  SOURCES ${KVR_ENGINE_TEST_DIR}/unit/test_options.c
  TIMEOUT 60 LABELS engine)

kvr_unit_test(test_model
  SOURCES ${KVR_ENGINE_TEST_DIR}/unit/test_model.c
  TIMEOUT 60 LABELS engine)
