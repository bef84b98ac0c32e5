/* status.c - strings for enum kvr_status, generated from KVR_STATUS_MAP. */
#include "status.h"

const char *kvr_status_str(int status) {
    switch (status) {
#define KVR_STATUS_STR(name, value, msg) \
    case (value):                        \
        return (msg);
        KVR_STATUS_MAP(KVR_STATUS_STR)
#undef KVR_STATUS_STR
    }
    return "unknown status";
}

const char *kvr_status_name(int status) {
    switch (status) {
#define KVR_STATUS_NAME(name, value, msg) \
    case (value):                         \
        return #name;
        KVR_STATUS_MAP(KVR_STATUS_NAME)
#undef KVR_STATUS_NAME
    }
    return "UNKNOWN";
}
