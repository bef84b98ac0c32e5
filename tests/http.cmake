# The coordinator's HTTP front end, /metrics and grpc.health.v1 end to end (issue 10), driven
# by independent clients: the openai npm package, curl, prometheus_client and grpcio (Debian
# python3-prometheus-client and python3-grpcio, run by the system's /usr/bin/python3). One
# real cluster from the test builds (the decode node fails one seed mid-stream).
add_test(NAME test_http
  COMMAND /usr/bin/python3 ${CMAKE_CURRENT_SOURCE_DIR}/e2e/test_http.py ${KVR_TEST_BIN_DIR} ${KVR_SHARED_DIR}
          ${CMAKE_SOURCE_DIR})
set_tests_properties(test_http PROPERTIES TIMEOUT 300 LABELS "cluster;http" RUN_SERIAL TRUE
  ENVIRONMENT "OMPI_ALLOW_RUN_AS_ROOT=1;OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1;OMPI_MCA_rmaps_base_oversubscribe=1")

# The metrics module alone (coordinator/metrics.c): counting, forwarding, rendering.
kvr_unit_test(test_metrics SOURCES ${CMAKE_CURRENT_SOURCE_DIR}/unit/test_metrics.c LIBS kvr_coord_metrics
  TIMEOUT 30 LABELS "unit;http")
