# Deploy paths (issue 11): a cluster across emulated hosts (network namespaces on a bridge),
# Slurm, the container image and the Kubernetes manifests. The scripts skip with exit 77
# and a printed reason when the machine lacks a capability (SKIP_RETURN_CODE), never
# silently. RUN_SERIAL: each starts a whole cluster on the 2 shared cores.
set(KVR_DEPLOY_TEST_DIR ${CMAKE_CURRENT_SOURCE_DIR}/deploy)

# The client side of every deploy test: N concurrent `kvrelay submit` checked against the
# golden texts. A tool, not a test.
add_executable(golden_submit ${KVR_DEPLOY_TEST_DIR}/golden_submit.c ${CMAKE_CURRENT_SOURCE_DIR}/unit/golden.c)
set_target_properties(golden_submit PROPERTIES RUNTIME_OUTPUT_DIRECTORY ${KVR_TEST_BIN_DIR})
target_include_directories(golden_submit PRIVATE ${CMAKE_CURRENT_SOURCE_DIR}/unit)
target_link_libraries(golden_submit PRIVATE kvr_common)
target_compile_definitions(golden_submit PRIVATE KVR_SHARED_DIR="${KVR_SHARED_DIR}")
add_dependencies(golden_submit kvrelay kvrelay-coordinator kvrelay-prefill kvrelay-decode)

set(KVR_DEPLOY_ENV "KVR_SHARED_DIR=${KVR_SHARED_DIR};OMPI_ALLOW_RUN_AS_ROOT=1;OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1")

# Registered in the plain build only: they test launch paths, images and manifests, not
# the nodes' memory safety (the sanitizer build runs the local cluster tests), and the
# suite must stay within its time budget.
if(KVR_SANITIZE)
  return()
endif()

add_test(NAME test_hosts_cluster
  COMMAND ${KVR_DEPLOY_TEST_DIR}/test_hosts_cluster.sh ${CMAKE_BINARY_DIR}/bin ${KVR_TEST_BIN_DIR} golden)
set_tests_properties(test_hosts_cluster PROPERTIES TIMEOUT 240 LABELS "deploy;hosts" RUN_SERIAL TRUE
  SKIP_RETURN_CODE 77 ENVIRONMENT "${KVR_DEPLOY_ENV}")
foreach(role decode prefill)
  add_test(NAME test_hosts_unplug_${role}
    COMMAND ${KVR_DEPLOY_TEST_DIR}/test_hosts_cluster.sh ${CMAKE_BINARY_DIR}/bin ${KVR_TEST_BIN_DIR} unplug-${role})
  set_tests_properties(test_hosts_unplug_${role} PROPERTIES TIMEOUT 240 LABELS "deploy;hosts" RUN_SERIAL TRUE
    SKIP_RETURN_CODE 77 ENVIRONMENT "${KVR_DEPLOY_ENV}")
endforeach()

add_test(NAME test_slurm
  COMMAND ${KVR_DEPLOY_TEST_DIR}/test_slurm.sh ${CMAKE_BINARY_DIR}/bin ${KVR_TEST_BIN_DIR})
set_tests_properties(test_slurm PROPERTIES TIMEOUT 480 LABELS "deploy;slurm" RUN_SERIAL TRUE
  SKIP_RETURN_CODE 77 ENVIRONMENT "${KVR_DEPLOY_ENV}")
# The elastic decode pool under Slurm (issue 14): a decode node joining as a second job,
# serving, and leaving on scancel (test_slurm.sh, mode "join").
add_test(NAME test_slurm_join
  COMMAND ${KVR_DEPLOY_TEST_DIR}/test_slurm.sh ${CMAKE_BINARY_DIR}/bin ${KVR_TEST_BIN_DIR} join)
set_tests_properties(test_slurm_join PROPERTIES TIMEOUT 300 LABELS "deploy;slurm" RUN_SERIAL TRUE
  SKIP_RETURN_CODE 77 ENVIRONMENT "${KVR_DEPLOY_ENV}")

# The image is built from the source tree inside podman (not from this build directory);
# only the client that talks to it comes from here.
add_test(NAME test_image COMMAND ${KVR_DEPLOY_TEST_DIR}/test_image.sh ${KVR_TEST_BIN_DIR})
set_tests_properties(test_image PROPERTIES TIMEOUT 900 LABELS "deploy;image" RUN_SERIAL TRUE
  SKIP_RETURN_CODE 77 ENVIRONMENT "${KVR_DEPLOY_ENV};KVR_CLIENT=${CMAKE_BINARY_DIR}/bin/kvrelay")

add_test(NAME test_k8s_manifests COMMAND ${KVR_DEPLOY_TEST_DIR}/test_k8s_manifests.sh)
set_tests_properties(test_k8s_manifests PROPERTIES TIMEOUT 180 LABELS "deploy;k8s" SKIP_RETURN_CODE 77)
