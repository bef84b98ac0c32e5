# The coordinator's gRPC edge against hostile or unlucky clients (issue 15): bearer
# tokens (coordinator/auth.c), TLS and mTLS with certificates made at test time by
# openssl, message-size limits and the bounded output queue of slow readers. A real
# server on localhost ports with fake_router.c in place of the MPI router.
set(KVR_SEC_TEST_DIR ${CMAKE_CURRENT_SOURCE_DIR})
kvr_unit_test(test_grpc_security
  SOURCES ${KVR_SEC_TEST_DIR}/unit/test_grpc_security.c ${KVR_SEC_TEST_DIR}/unit/fake_router.c
  LIBS kvr_coord_grpc kvr_client Threads::Threads
  TIMEOUT 120 LABELS grpc)
target_include_directories(test_grpc_security PRIVATE ${CMAKE_SOURCE_DIR}/coordinator)
# It runs build/bin/kvrelay submit/status.
add_dependencies(test_grpc_security kvrelay)
