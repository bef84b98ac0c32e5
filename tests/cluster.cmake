# End-to-end tests of the cluster (issue 6): real mpirun, real processes, real gRPC on
# localhost. Each scenario (an argument of test_cluster) starts its own cluster with
# `kvrelay up`. RUN_SERIAL keeps ctest -j from overlapping them on the 2 shared cores.
set(KVR_CLUSTER_TEST_DIR ${CMAKE_CURRENT_SOURCE_DIR})
kvr_unit_test(test_cluster_golden
  SOURCES ${KVR_CLUSTER_TEST_DIR}/e2e/test_cluster.c ${KVR_CLUSTER_TEST_DIR}/e2e/cluster_harness.c ${KVR_CLUSTER_TEST_DIR}/e2e/run_cmd.c
          ${KVR_CLUSTER_TEST_DIR}/unit/golden.c
  LIBS kvr_client Threads::Threads
  ARGS golden
  TIMEOUT 240 LABELS cluster)
target_include_directories(test_cluster_golden PRIVATE ${KVR_CLUSTER_TEST_DIR}/e2e)
add_dependencies(test_cluster_golden kvrelay kvrelay-coordinator kvrelay-prefill kvrelay-decode)
set_tests_properties(test_cluster_golden PROPERTIES RUN_SERIAL TRUE)
foreach(scenario memory timeout faults colocated secure launcher)
  add_test(NAME test_cluster_${scenario} COMMAND test_cluster_golden ${scenario})
  set_tests_properties(test_cluster_${scenario} PROPERTIES TIMEOUT 240 LABELS cluster RUN_SERIAL TRUE
    ENVIRONMENT "OMPI_ALLOW_RUN_AS_ROOT=1;OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1;OMPI_MCA_rmaps_base_oversubscribe=1")
endforeach()

# The --weights auto rule of the nodes (pure function, no MPI).
kvr_unit_test(test_role SOURCES ${KVR_CLUSTER_TEST_DIR}/unit/test_role.c LABELS cluster)
