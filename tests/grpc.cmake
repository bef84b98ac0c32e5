# Tests of the coordinator's gRPC front end and the client (issue 6): a real server on a
# localhost port with a fake router, the real client, raw C-core bytes, and the kvrelay
# submit/status commands end to end.
set(KVR_GRPC_TEST_DIR ${CMAKE_CURRENT_SOURCE_DIR})

kvr_unit_test(test_grpc_server
  SOURCES ${KVR_GRPC_TEST_DIR}/unit/test_grpc_server.c ${KVR_GRPC_TEST_DIR}/unit/fake_router.c
          ${KVR_GRPC_TEST_DIR}/unit/golden.c
  LIBS kvr_coord_grpc kvr_client Threads::Threads
  TIMEOUT 90 LABELS grpc)
# It runs build/bin/kvrelay submit/status.
add_dependencies(test_grpc_server kvrelay)

# The gRPC-free request module (issue 15): a table of requests at their extremes against
# cluster limits, and the block arithmetic placement shares.
kvr_unit_test(test_request
  SOURCES ${KVR_GRPC_TEST_DIR}/unit/test_request.c
  LIBS kvr_coord_request
  TIMEOUT 60 LABELS unit protocol)

# The elastic pool's scaling policy on invented samples (issue 14).
kvr_unit_test(test_autoscale
  SOURCES ${KVR_GRPC_TEST_DIR}/unit/test_autoscale.c
  LIBS kvr_coord_router
  TIMEOUT 30 LABELS unit)

# The router against a fake transport and clock (issue 15): no MPI, any number of nodes.
kvr_unit_test(test_router
  SOURCES ${KVR_GRPC_TEST_DIR}/unit/test_router.c
  LIBS kvr_coord_router
  TIMEOUT 60 LABELS unit protocol)
