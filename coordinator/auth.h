/* auth.h - bearer-token authentication of the coordinator's clients, free of any
 * transport: the gRPC front end (grpc_server.c) passes it the value of a call's
 * `authorization` metadata, and an HTTP front end would pass its Authorization header.
 *
 * Tokens come from a file (--auth-token-file): one token per line; blank lines and lines
 * starting with '#' are skipped; surrounding spaces, tabs and CR are trimmed. Several
 * tokens may be valid at once (rotation: add the new one, move the clients, remove the
 * old one). A token is 16 to 4096 visible ASCII characters (0x21-0x7e). */
#ifndef KVR_COORD_AUTH_H
#define KVR_COORD_AUTH_H

#include <stddef.h>

struct coord_auth;

enum coord_auth_verdict {
    COORD_AUTH_OK = 0,        /* a valid token */
    COORD_AUTH_MISSING = 1,   /* no credentials at all */
    COORD_AUTH_MALFORMED = 2, /* not "Bearer <token>" */
    COORD_AUTH_WRONG = 3,     /* a bearer token that is not one of ours */
};

/* Reads the token file at path. Returns KVR_OK with owned *out (free with
 * coord_auth_free); KVR_EIO (unreadable), KVR_EINVAL (no token, or a line that is not a
 * valid token), KVR_ENOMEM; err gets a one-line reason (never the token itself). */
int coord_auth_load(const char *path, struct coord_auth **out, char *err, size_t err_len);

/* Builds the table from tokens in memory (same rules as one file line each); for tests
 * and for callers that got the secret some other way. */
int coord_auth_create(const char *const *tokens, int n_tokens, struct coord_auth **out, char *err,
                      size_t err_len);

void coord_auth_free(struct coord_auth *a);

/* Number of tokens loaded. */
int coord_auth_count(const struct coord_auth *a);

/* Checks one credential: value (len bytes, need not end with NUL; NULL = absent) is an
 * Authorization value, "Bearer <token>" (the scheme case-insensitive, as RFC 7235 says,
 * one or more spaces after it). Compares with every loaded token in time that depends
 * only on len and the number of tokens, never on where the bytes differ or on a loaded
 * token's length. Thread-safe (reads only). */
enum coord_auth_verdict coord_auth_check(const struct coord_auth *a, const char *value, size_t len);

/* "ok", "missing", "malformed", "wrong". */
const char *coord_auth_verdict_name(enum coord_auth_verdict v);

#endif /* KVR_COORD_AUTH_H */
