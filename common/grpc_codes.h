/* grpc_codes.h - the names of gRPC's status codes (their wire values, fixed by the gRPC
 * spec), so that the coordinator's logs and the client's messages use the same words.
 * Plain strings: nothing here links gRPC. */
#ifndef KVR_GRPC_CODES_H
#define KVR_GRPC_CODES_H

/* "INVALID_ARGUMENT" for 3 (a grpc_status_code value); "UNKNOWN_CODE" when out of range.
 * Static storage. */
const char *kvr_grpc_code_name(int code);

#endif /* KVR_GRPC_CODES_H */
