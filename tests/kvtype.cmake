# Tests of the KV cache's storage type (issue 13, --kv-type f32|f16|bf16): the half
# attention kernels of every variant, pool accounting, the wire round trip, the engine
# and every policy against the f32 cache, and `kvrelay ppl --kv-type` end to end.
set(KVR_KVTYPE_TEST_DIR ${CMAKE_CURRENT_SOURCE_DIR})

kvr_unit_test(test_kv_type
  SOURCES ${KVR_KVTYPE_TEST_DIR}/unit/test_kv_type.c ${KVR_KVTYPE_TEST_DIR}/unit/golden.c
  TIMEOUT 120 LABELS kvcache)
# The engine and policy parts again on the AVX2 and scalar forward pass (the kernel part
# tests every variant in each run anyway).
foreach(k avx2 scalar)
  add_test(NAME test_kv_type_${k} COMMAND test_kv_type)
  set_tests_properties(test_kv_type_${k} PROPERTIES TIMEOUT 120 LABELS kvcache ENVIRONMENT "KVR_KERNEL=${k}")
endforeach()

# End to end: the product binary must exist before this runs.
kvr_unit_test(test_cli_kvtype
  SOURCES ${KVR_KVTYPE_TEST_DIR}/e2e/test_cli_kvtype.c ${KVR_KVTYPE_TEST_DIR}/e2e/run_cmd.c
  TIMEOUT 120 LABELS kvcache e2e)
target_include_directories(test_cli_kvtype PRIVATE ${KVR_KVTYPE_TEST_DIR}/e2e)
add_dependencies(test_cli_kvtype kvrelay)
