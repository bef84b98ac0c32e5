/* auth.c - bearer tokens for the coordinator's front ends (see auth.h). Owns the loaded
 * tokens; grpc_server.c calls coord_auth_check for every call that needs it. */
#include "auth.h"

#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "status.h"

#define TOKEN_MIN  16
#define TOKEN_MAX  4096
#define TOKENS_MAX 64

struct coord_auth {
    int n;
    size_t len[TOKENS_MAX];
    char *tok[TOKENS_MAX]; /* (len[i]) bytes each, owned */
};

const char *coord_auth_verdict_name(enum coord_auth_verdict v) {
    switch (v) {
    case COORD_AUTH_OK:
        return "ok";
    case COORD_AUTH_MISSING:
        return "missing";
    case COORD_AUTH_MALFORMED:
        return "malformed";
    case COORD_AUTH_WRONG:
        return "wrong";
    }
    return "wrong";
}

void coord_auth_free(struct coord_auth *a) {
    if (!a)
        return;
    for (int i = 0; i < a->n; i++) {
        /* Do not leave the secret in freed memory. */
        volatile char *p = a->tok[i];
        for (size_t k = 0; k < a->len[i]; k++)
            p[k] = 0;
        free(a->tok[i]);
    }
    free(a);
}

int coord_auth_count(const struct coord_auth *a) {
    return a ? a->n : 0;
}

static int visible(unsigned char c) {
    return c >= 0x21 && c <= 0x7e;
}

/* Adds s[0..len) (already trimmed). */
static int add_token(struct coord_auth *a, const char *s, size_t len, int line, char *err,
                     size_t err_len) {
    if (len < TOKEN_MIN || len > TOKEN_MAX) {
        snprintf(err, err_len, "token on line %d has %zu characters; tokens have %d to %d", line,
                 len, TOKEN_MIN, TOKEN_MAX);
        return KVR_EINVAL;
    }
    for (size_t i = 0; i < len; i++) {
        if (!visible((unsigned char)s[i])) {
            snprintf(err, err_len,
                     "token on line %d has a character outside visible ASCII (0x21-0x7e) "
                     "at position %zu",
                     line, i + 1);
            return KVR_EINVAL;
        }
    }
    if (a->n >= TOKENS_MAX) {
        snprintf(err, err_len, "more than %d tokens", TOKENS_MAX);
        return KVR_EINVAL;
    }
    char *t = malloc(len);
    if (!t)
        return KVR_ENOMEM;
    memcpy(t, s, len);
    a->tok[a->n] = t;
    a->len[a->n] = len;
    a->n++;
    return KVR_OK;
}

/* Parses text (n bytes) line by line into a. */
static int parse_lines(struct coord_auth *a, const char *text, size_t n, char *err,
                       size_t err_len) {
    int line = 0;
    for (size_t i = 0; i < n;) {
        size_t end = i;
        while (end < n && text[end] != '\n')
            end++;
        line++;
        size_t b = i, e = end;
        while (b < e && (text[b] == ' ' || text[b] == '\t' || text[b] == '\r'))
            b++;
        while (e > b && (text[e - 1] == ' ' || text[e - 1] == '\t' || text[e - 1] == '\r'))
            e--;
        if (e > b && text[b] != '#') {
            int rc = add_token(a, text + b, e - b, line, err, err_len);
            if (rc != KVR_OK)
                return rc;
        }
        i = end + 1;
    }
    if (a->n == 0) {
        snprintf(err, err_len, "no token (one per line; blank and '#' lines are skipped)");
        return KVR_EINVAL;
    }
    return KVR_OK;
}

int coord_auth_create(const char *const *tokens, int n_tokens, struct coord_auth **out, char *err,
                      size_t err_len) {
    *out = NULL;
    struct coord_auth *a = calloc(1, sizeof *a);
    if (!a)
        return KVR_ENOMEM;
    int rc = KVR_OK;
    for (int i = 0; i < n_tokens && rc == KVR_OK; i++)
        rc = add_token(a, tokens[i], strlen(tokens[i]), i + 1, err, err_len);
    if (rc == KVR_OK && a->n == 0) {
        snprintf(err, err_len, "no token");
        rc = KVR_EINVAL;
    }
    if (rc != KVR_OK) {
        coord_auth_free(a);
        return rc;
    }
    *out = a;
    return KVR_OK;
}

int coord_auth_load(const char *path, struct coord_auth **out, char *err, size_t err_len) {
    *out = NULL;
    FILE *f = fopen(path, "rb");
    if (!f) {
        snprintf(err, err_len, "cannot read %s: %s", path, strerror(errno));
        return KVR_EIO;
    }
    /* A token file is small: refuse anything that could not be one. */
    size_t cap = (size_t)TOKENS_MAX * (TOKEN_MAX + 2) + 65536;
    char *text = malloc(cap);
    if (!text) {
        fclose(f);
        return KVR_ENOMEM;
    }
    size_t n = fread(text, 1, cap, f);
    int read_err = ferror(f);
    fclose(f);
    int rc;
    if (read_err) {
        snprintf(err, err_len, "cannot read %s", path);
        rc = KVR_EIO;
    } else if (n == cap) {
        snprintf(err, err_len, "%s is too large for a token file", path);
        rc = KVR_EINVAL;
    } else {
        struct coord_auth *a = calloc(1, sizeof *a);
        rc = a ? parse_lines(a, text, n, err, err_len) : KVR_ENOMEM;
        if (rc == KVR_OK)
            *out = a;
        else
            coord_auth_free(a);
    }
    volatile char *p = text;
    for (size_t i = 0; i < n; i++)
        p[i] = 0;
    free(text);
    return rc;
}

/* 0 when presented (n bytes) equals tok (tlen bytes). The loop runs over the presented
 * bytes only, reading tok cyclically, so its time depends on n (which the client chose),
 * not on tlen or on where the first difference is. */
static unsigned ct_differs(const unsigned char *presented, size_t n, const unsigned char *tok,
                           size_t tlen) {
    unsigned diff = (unsigned)((n ^ tlen) != 0);
    size_t j = 0;
    for (size_t i = 0; i < n; i++) {
        diff |= (unsigned)(presented[i] ^ tok[j]);
        j = (j + 1 == tlen) ? 0 : j + 1;
    }
    return diff;
}

enum coord_auth_verdict coord_auth_check(const struct coord_auth *a, const char *value,
                                         size_t len) {
    if (!value || len == 0)
        return COORD_AUTH_MISSING;
    static const char scheme[] = "bearer";
    if (len < sizeof scheme)
        return COORD_AUTH_MALFORMED;
    for (size_t i = 0; i < sizeof scheme - 1; i++) {
        char c = value[i];
        if (c >= 'A' && c <= 'Z')
            c = (char)(c - 'A' + 'a');
        if (c != scheme[i])
            return COORD_AUTH_MALFORMED;
    }
    size_t i = sizeof scheme - 1;
    if (value[i] != ' ')
        return COORD_AUTH_MALFORMED;
    while (i < len && value[i] == ' ')
        i++;
    const unsigned char *t = (const unsigned char *)value + i;
    size_t n = len - i;
    if (n == 0)
        return COORD_AUTH_MALFORMED;
    /* Every loaded token is compared (no early exit), so the time does not say which one
     * matched or how many came before it. */
    unsigned ok = 0;
    for (int k = 0; k < a->n; k++)
        ok |= (unsigned)(ct_differs(t, n, (const unsigned char *)a->tok[k], a->len[k]) == 0);
    return ok ? COORD_AUTH_OK : COORD_AUTH_WRONG;
}
