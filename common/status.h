/* status.h - the one error vocabulary of kvrelay.
 * Every fallible function returns enum kvr_status: 0 is success, negative is failure.
 * Codes and their strings come from one X-macro so they cannot drift. */
#ifndef KVR_STATUS_H
#define KVR_STATUS_H

/* X(name, value, message). Values are part of the MPI wire protocol (a failed request
 * carries its status to the coordinator): only append at the end, never renumber. */
#define KVR_STATUS_MAP(X)                                                        \
    X(OK, 0, "ok")                                                               \
    X(EINVAL, -1, "invalid argument")                                            \
    X(EAGAIN, -2, "not finished, call again")                                    \
    X(ENOMEM, -3, "out of memory")                                               \
    X(EIO, -4, "input/output error")                                             \
    X(ENOENT, -5, "no such file")                                                \
    X(EFORMAT, -6, "malformed data")                                             \
    X(ENOSPC, -7, "no free KV blocks")                                           \
    X(ERANGE, -8, "value out of range")                                          \
    X(ECONTEXT, -9, "context length exceeded")                                   \
    X(ETRUNC, -10, "truncated input")                                            \
    X(EMAGIC, -11, "bad magic number")                                           \
    X(EVERSION, -12, "unsupported format version")                               \
    X(ECHECKSUM, -13, "checksum mismatch")                                       \
    X(EFINGERPRINT, -14, "model fingerprint mismatch")                           \
    X(ELENGTH, -15, "lengths disagree")                                          \
    X(EOVERFLOW, -16, "decompressed size exceeds the declared size")             \
    X(ECOMPRESS, -17, "compression library error")                               \
    X(EMPI, -18, "MPI error")                                                    \
    X(EGRPC, -19, "gRPC error")                                                  \
    X(ECANCELED, -20, "canceled")                                                \
    X(ETIMEDOUT, -21, "timed out")                                               \
    X(EUNAVAIL, -22, "unavailable")                                              \
    X(ENOTSUP, -23, "not supported")                                             \
    X(ESHAPE, -24, "shape does not match the model")                             \
    X(EFULL, -25, "queue full")                                                  \
    X(EINTERNAL, -26, "internal error")                                          \
    X(EDEADLINE, -27, "deadline exceeded")                                       \
    X(EABORTED, -28, "aborted")

enum kvr_status {
#define KVR_STATUS_ENUM(name, value, msg) KVR_##name = (value),
    KVR_STATUS_MAP(KVR_STATUS_ENUM)
#undef KVR_STATUS_ENUM
};

/* Human-readable message for a status ("no free KV blocks"); unknown values give
 * "unknown status". Returns a static string. */
const char *kvr_status_str(int status);

/* Symbolic name of a status without the prefix ("ENOSPC"); static string. */
const char *kvr_status_name(int status);

#endif /* KVR_STATUS_H */
