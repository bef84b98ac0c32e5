# Tests of the paged KV cache and its long-context policies (issue 4): pool accounting and
# a randomized allocator walk, the policies against a naive reference, export/import across
# block sizes, mixed-policy batches, perplexity identities, and `kvrelay ppl` end to end.
set(KVR_KVC_TEST_DIR ${CMAKE_CURRENT_SOURCE_DIR})

kvr_unit_test(test_kv_cache
  SOURCES ${KVR_KVC_TEST_DIR}/unit/test_kv_cache.c
  TIMEOUT 120 LABELS kvcache)

kvr_unit_test(test_policies
  SOURCES ${KVR_KVC_TEST_DIR}/unit/test_policies.c
  TIMEOUT 300 LABELS kvcache)

kvr_unit_test(test_ppl
  SOURCES ${KVR_KVC_TEST_DIR}/unit/test_ppl.c
  TIMEOUT 300 LABELS kvcache)

# End to end: the product binary must exist before this runs.
kvr_unit_test(test_cli_ppl
  SOURCES ${KVR_KVC_TEST_DIR}/e2e/test_cli_ppl.c ${KVR_KVC_TEST_DIR}/e2e/run_cmd.c
  TIMEOUT 180 LABELS kvcache e2e)
target_include_directories(test_cli_ppl PRIVATE ${KVR_KVC_TEST_DIR}/e2e)
add_dependencies(test_cli_ppl kvrelay)
