/* http_server.c - the OpenAI-compatible HTTP front end (see http_server.h), on
 * libmicrohttpd in thread-per-connection mode. Each /v1 request is read whole, parsed with
 * json-c, turned into a coord_gen_input for the shared request module (request.h), and
 * submitted to the router; the connection's thread then waits for the router's tokens
 * (coord_http_stream_ops, called on the router's thread), renders them as text, applies
 * stop strings and writes JSON or SSE. This file is the one edge where kvr_status becomes
 * an HTTP status (docs/API.md, "HTTP errors"). */
#include "http_server.h"

#include <arpa/inet.h>
#include <errno.h>
#include <inttypes.h>
#include <netdb.h>
#include <poll.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>

#include <json-c/json.h>
#include <microhttpd.h>

#include "clock.h"
#include "log.h"
#include "request.h"
#include "status.h"

#define HTTP_DEFAULT_MAX_BODY      ((size_t)4 << 20)
#define HTTP_MAX_STOPS             4   /* OpenAI's limit on stop strings */
#define HTTP_MAX_STOP_LEN          256 /* bytes of one stop string */
#define HTTP_COMPLETION_MAX_TOKENS 16  /* /v1/completions' default max_tokens (OpenAI's) */
#define HTTP_WAIT_MS               20  /* a waiting connection checks its socket this often */
/* An idle keep-alive connection is closed after this many seconds (it holds a thread). A
 * request waiting for its tokens is not idle: libmicrohttpd only counts time between
 * reads and writes, and it is inside our handler meanwhile. */
#define HTTP_IDLE_S 300

/* ---------------------------------------------------------------------------------------
 * A growable byte buffer
 * ------------------------------------------------------------------------------------- */

struct sbuf {
    char *p;
    size_t n, cap;
    int oom;
};

static void sb_reserve(struct sbuf *b, size_t more) {
    if (b->oom || b->n + more + 1 <= b->cap)
        return;
    size_t cap = b->cap ? b->cap : 256;
    while (cap < b->n + more + 1)
        cap *= 2;
    char *p = realloc(b->p, cap);
    if (!p) {
        b->oom = 1;
        return;
    }
    b->p = p;
    b->cap = cap;
}

static void sb_add(struct sbuf *b, const char *s, size_t n) {
    sb_reserve(b, n);
    if (b->oom)
        return;
    memcpy(b->p + b->n, s, n);
    b->n += n;
    b->p[b->n] = '\0';
}

static void sb_puts(struct sbuf *b, const char *s) {
    sb_add(b, s, strlen(s));
}

static void sb_printf(struct sbuf *b, const char *fmt, ...) {
    char tmp[512];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(tmp, sizeof tmp, fmt, ap);
    va_end(ap);
    if (n < 0)
        return;
    if ((size_t)n < sizeof tmp) {
        sb_add(b, tmp, (size_t)n);
        return;
    }
    sb_reserve(b, (size_t)n);
    if (b->oom)
        return;
    va_start(ap, fmt);
    vsnprintf(b->p + b->n, (size_t)n + 1, fmt, ap);
    va_end(ap);
    b->n += (size_t)n;
}

static void sb_free(struct sbuf *b) {
    free(b->p);
    memset(b, 0, sizeof *b);
}

/* Length of the valid UTF-8 sequence at s (n bytes left), or 0 if it is invalid or cut. */
static size_t utf8_len(const unsigned char *s, size_t n) {
    unsigned c = s[0];
    size_t len;
    unsigned min;
    if (c < 0x80)
        return 1;
    if (c >= 0xc2 && c <= 0xdf)
        len = 2, min = 0x80;
    else if (c >= 0xe0 && c <= 0xef)
        len = 3, min = 0x800;
    else if (c >= 0xf0 && c <= 0xf4)
        len = 4, min = 0x10000;
    else
        return 0;
    if (n < len)
        return 0;
    unsigned cp = c & (0x7f >> len);
    for (size_t i = 1; i < len; i++) {
        if ((s[i] & 0xc0) != 0x80)
            return 0;
        cp = (cp << 6) | (s[i] & 0x3f);
    }
    if (cp < min || cp > 0x10ffff || (cp >= 0xd800 && cp <= 0xdfff))
        return 0;
    return len;
}

/* s (n bytes) as a JSON string literal: quotes, backslashes and control characters
 * escaped, valid UTF-8 kept, every invalid byte as U+FFFD. */
static void sb_json_str(struct sbuf *b, const char *s, size_t n) {
    sb_add(b, "\"", 1);
    const unsigned char *u = (const unsigned char *)s;
    for (size_t i = 0; i < n;) {
        unsigned c = u[i];
        if (c == '"' || c == '\\') {
            char e[2] = {'\\', (char)c};
            sb_add(b, e, 2);
            i++;
        } else if (c == '\n') {
            sb_add(b, "\\n", 2);
            i++;
        } else if (c == '\r') {
            sb_add(b, "\\r", 2);
            i++;
        } else if (c == '\t') {
            sb_add(b, "\\t", 2);
            i++;
        } else if (c < 0x20 || c == 0x7f) {
            sb_printf(b, "\\u%04x", c);
            i++;
        } else {
            size_t k = utf8_len(u + i, n - i);
            if (k == 0) {
                sb_add(b, "\xef\xbf\xbd", 3);
                i++;
            } else {
                sb_add(b, s + i, k);
                i += k;
            }
        }
    }
    sb_add(b, "\"", 1);
}

static void sb_json_cstr(struct sbuf *b, const char *s) {
    sb_json_str(b, s, strlen(s));
}

/* ---------------------------------------------------------------------------------------
 * Types
 * ------------------------------------------------------------------------------------- */

struct coord_http {
    struct MHD_Daemon *d;
    struct coord_router *router;
    const struct kvr_tokenizer *tok;
    int seq_len, vocab_size;
    char *model_name;
    enum coord_chat_template chat_template;
    struct coord_metrics *metrics;
    size_t max_body;
    int (*authorize)(void *ctx, const char *value);
    void *authorize_ctx;
    struct coord_req_ctx req_ctx;
    int port;
    time_t created;
    atomic_int stopping;
    atomic_ullong serial;
};

/* One generation request. Shared by the connection's thread and the router's thread: refs
 * counts the connection (until the handler is done with it) and the router (until finish). */
struct http_req {
    struct coord_stream_head head; /* first: coord_front_ops casts the stream to it */
    struct coord_http *h;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    int refs;
    /* Filled by the router's thread, guarded by mu. */
    int *q; /* (q_cap) token ids not yet taken by the connection */
    int q_n, q_cap;
    int q_oom;
    int finished;
    int fin_status;
    enum coord_finish fin_reason;
    struct coord_usage fin_usage;
    char fin_msg[256];
    /* The connection's thread only. */
    uint64_t id;
    int submitted;
    int chat, stream, include_usage;
    int n_prompt;
    int prev;         /* the token before the next one to render */
    int n_completion; /* tokens taken into the text (up to the one that completed a stop) */
    int stop_hit;
    int ended; /* finish taken: fin_* copied below */
    int status;
    enum coord_finish reason;
    struct coord_usage usage;
    char msg[256];
    char *stops[HTTP_MAX_STOPS];
    int n_stops;
    size_t stop_max;  /* longest stop string in bytes */
    struct sbuf text; /* the generated text, stop string and what follows cut */
    size_t sent;      /* bytes of text already given to the client */
    char rid[48];     /* "cmpl-..." or "chatcmpl-..." */
    time_t created;
    int fd; /* the client's socket (checked for a hang-up while waiting) */
    /* Streaming: bytes produced for the client and not yet handed to libmicrohttpd. */
    struct sbuf out;
    size_t out_off;
    int role_sent, final_sent, done;
};

/* Per connection (libmicrohttpd's con_cls): the request body as it arrives. */
struct http_conn {
    struct sbuf body;
    int too_big;
    int answered; /* a response is queued already */
};

static void req_unref(struct http_req *r) {
    pthread_mutex_lock(&r->mu);
    int left = --r->refs;
    pthread_mutex_unlock(&r->mu);
    if (left > 0)
        return;
    free(r->q);
    for (int i = 0; i < r->n_stops; i++)
        free(r->stops[i]);
    sb_free(&r->text);
    sb_free(&r->out);
    pthread_cond_destroy(&r->cv);
    pthread_mutex_destroy(&r->mu);
    free(r);
}

/* ---------------------------------------------------------------------------------------
 * The router's callbacks (router thread)
 * ------------------------------------------------------------------------------------- */

static void http_tokens(struct coord_stream *s, const int *ids, int n) {
    struct http_req *r = (struct http_req *)s;
    pthread_mutex_lock(&r->mu);
    if (r->q_n + n > r->q_cap) {
        int cap = r->q_cap ? r->q_cap * 2 : 64;
        while (cap < r->q_n + n)
            cap *= 2;
        int *q = realloc(r->q, (size_t)cap * sizeof *q);
        if (!q) {
            r->q_oom = 1;
            pthread_cond_signal(&r->cv);
            pthread_mutex_unlock(&r->mu);
            return;
        }
        r->q = q;
        r->q_cap = cap;
    }
    memcpy(r->q + r->q_n, ids, (size_t)n * sizeof *ids);
    r->q_n += n;
    pthread_cond_signal(&r->cv);
    pthread_mutex_unlock(&r->mu);
}

static void http_finish(struct coord_stream *s, int status, enum coord_finish reason,
                        const struct coord_usage *u, const char *msg) {
    struct http_req *r = (struct http_req *)s;
    pthread_mutex_lock(&r->mu);
    r->finished = 1;
    r->fin_status = status;
    r->fin_reason = reason;
    r->fin_usage = *u;
    snprintf(r->fin_msg, sizeof r->fin_msg, "%s", msg ? msg : "");
    pthread_cond_signal(&r->cv);
    pthread_mutex_unlock(&r->mu);
    req_unref(r); /* the router's reference */
}

const struct coord_stream_ops coord_http_stream_ops = {.tokens = http_tokens,
                                                       .finish = http_finish};

/* ---------------------------------------------------------------------------------------
 * Responses
 * ------------------------------------------------------------------------------------- */

static enum MHD_Result respond(struct MHD_Connection *conn, unsigned code, const char *type,
                               struct sbuf *body) {
    if (body->oom) {
        static const char oom[] =
            "{\"error\":{\"message\":\"coordinator out of memory\",\"type\":\"server_error\","
            "\"param\":null,\"code\":\"out_of_memory\"}}\n";
        struct MHD_Response *res = MHD_create_response_from_buffer(
            sizeof oom - 1, (void *)(uintptr_t)oom, MHD_RESPMEM_PERSISTENT);
        if (!res)
            return MHD_NO;
        MHD_add_response_header(res, "Content-Type", "application/json");
        enum MHD_Result ret = MHD_queue_response(conn, MHD_HTTP_INTERNAL_SERVER_ERROR, res);
        MHD_destroy_response(res);
        return ret;
    }
    struct MHD_Response *res = MHD_create_response_from_buffer(
        body->n, body->p ? body->p : (char *)"", MHD_RESPMEM_MUST_COPY);
    if (!res)
        return MHD_NO;
    MHD_add_response_header(res, "Content-Type", type);
    enum MHD_Result ret = MHD_queue_response(conn, code, res);
    MHD_destroy_response(res);
    return ret;
}

static const char *error_type(unsigned code) {
    switch (code) {
    case 400:
        return "invalid_request_error";
    case 401:
        return "authentication_error";
    case 404:
        return "not_found_error";
    case 405:
        return "invalid_request_error";
    case 429:
        return "overloaded_error";
    case 503:
        return "service_unavailable_error";
    case 504:
        return "timeout_error";
    default:
        return "server_error";
    }
}

/* {"error": {"message", "type", "param", "code"}} (param and code may be NULL: null). */
static void error_json(struct sbuf *b, unsigned code, const char *msg, const char *param,
                       const char *ecode) {
    sb_puts(b, "{\"error\":{\"message\":");
    sb_json_cstr(b, msg);
    sb_puts(b, ",\"type\":");
    sb_json_cstr(b, error_type(code));
    sb_puts(b, ",\"param\":");
    if (param)
        sb_json_cstr(b, param);
    else
        sb_puts(b, "null");
    sb_puts(b, ",\"code\":");
    if (ecode)
        sb_json_cstr(b, ecode);
    else
        sb_puts(b, "null");
    sb_puts(b, "}}");
}

static enum MHD_Result respond_error(struct MHD_Connection *conn, unsigned code, const char *msg,
                                     const char *param, const char *ecode) {
    struct sbuf b = {0};
    error_json(&b, code, msg, param, ecode);
    sb_puts(&b, "\n");
    KVR_LOG_INFO("HTTP %u %s: %s", code, ecode ? ecode : "", msg);
    enum MHD_Result ret = respond(conn, code, "application/json", &b);
    sb_free(&b);
    return ret;
}

/* The one table from kvr_status to HTTP (docs/API.md repeats it). */
static void status_to_http(int status, unsigned *code, const char **ecode) {
    switch (status) {
    case KVR_EINVAL:
    case KVR_ERANGE:
    case KVR_ECONTEXT:
        *code = 400, *ecode = "invalid_value";
        break;
    case KVR_ENOSPC:
        *code = 400, *ecode = "request_too_large";
        break;
    case KVR_EFULL:
        *code = 429, *ecode = "queue_full";
        break;
    case KVR_ETIMEDOUT:
        *code = 429, *ecode = "queue_timeout";
        break;
    case KVR_EUNAVAIL:
    case KVR_EMPI:
        *code = 503, *ecode = "unavailable";
        break;
    case KVR_ENOMEM:
        *code = 503, *ecode = "out_of_memory";
        break;
    case KVR_EDEADLINE:
        *code = 504, *ecode = "deadline_exceeded";
        break;
    case KVR_ECANCELED:
        *code = 503, *ecode = "cancelled";
        break;
    default:
        *code = 500, *ecode = "internal_error";
        break;
    }
}

/* ---------------------------------------------------------------------------------------
 * Reading a request body into a coord_gen_input
 * ------------------------------------------------------------------------------------- */

struct parsed {
    struct coord_gen_input in;
    int chat;
    int stream, include_usage;
    char *stops[HTTP_MAX_STOPS];
    int n_stops;
    int64_t *ids; /* owned: the prompt as ids (completions' array or the llama2 chat template) */
    struct sbuf prompt; /* owned: the chat prompt as text */
    char err[256];
    char param[64];
    unsigned code; /* 400 or 404 */
    const char *ecode;
};

static void parsed_free(struct parsed *p) {
    for (int i = 0; i < p->n_stops; i++)
        free(p->stops[i]);
    free(p->ids);
    sb_free(&p->prompt);
}

#define BAD(pa, param_, ecode_, ...)                                                               \
    do {                                                                                           \
        snprintf((pa)->param, sizeof(pa)->param, "%s", (param_));                                  \
        snprintf((pa)->err, sizeof(pa)->err, __VA_ARGS__);                                         \
        (pa)->ecode = (ecode_);                                                                    \
        return -1;                                                                                 \
    } while (0)

static int is_null(struct json_object *v) {
    return v == NULL || json_object_get_type(v) == json_type_null;
}

static int get_int(struct parsed *pa, const char *key, struct json_object *v, int64_t *out) {
    if (json_object_get_type(v) != json_type_int)
        BAD(pa, key, "invalid_type", "%s must be an integer", key);
    errno = 0;
    *out = json_object_get_int64(v);
    if (errno == ERANGE)
        BAD(pa, key, "invalid_value", "%s is out of range", key);
    return 0;
}

static int get_num(struct parsed *pa, const char *key, struct json_object *v, double *out) {
    enum json_type t = json_object_get_type(v);
    if (t != json_type_int && t != json_type_double)
        BAD(pa, key, "invalid_type", "%s must be a number", key);
    *out = json_object_get_double(v);
    return 0;
}

static int get_bool(struct parsed *pa, const char *key, struct json_object *v, int *out) {
    if (json_object_get_type(v) != json_type_boolean)
        BAD(pa, key, "invalid_type", "%s must be true or false", key);
    *out = json_object_get_boolean(v);
    return 0;
}

static int take_stop(struct parsed *pa, struct json_object *v) {
    if (json_object_get_type(v) == json_type_string) {
        struct json_object *one = v;
        v = NULL;
        if (json_object_get_string_len(one) == 0)
            BAD(pa, "stop", "invalid_value", "stop strings must not be empty");
        if (json_object_get_string_len(one) > HTTP_MAX_STOP_LEN)
            BAD(pa, "stop", "invalid_value", "a stop string is at most %d bytes",
                HTTP_MAX_STOP_LEN);
        if (!(pa->stops[0] = strdup(json_object_get_string(one))))
            BAD(pa, "stop", "out_of_memory", "coordinator out of memory");
        pa->n_stops = 1;
        return 0;
    }
    if (json_object_get_type(v) != json_type_array)
        BAD(pa, "stop", "invalid_type", "stop must be a string or an array of strings");
    size_t n = json_object_array_length(v);
    if (n > HTTP_MAX_STOPS)
        BAD(pa, "stop", "invalid_value", "at most %d stop strings (got %zu)", HTTP_MAX_STOPS, n);
    for (size_t i = 0; i < n; i++) {
        struct json_object *e = json_object_array_get_idx(v, i);
        if (json_object_get_type(e) != json_type_string)
            BAD(pa, "stop", "invalid_type", "stop[%zu] must be a string", i);
        int len = json_object_get_string_len(e);
        if (len == 0)
            BAD(pa, "stop", "invalid_value", "stop strings must not be empty");
        if (len > HTTP_MAX_STOP_LEN)
            BAD(pa, "stop", "invalid_value", "a stop string is at most %d bytes",
                HTTP_MAX_STOP_LEN);
        if (memchr(json_object_get_string(e), '\0', (size_t)len))
            BAD(pa, "stop", "invalid_value", "stop[%zu] contains a NUL character", i);
        if (!(pa->stops[pa->n_stops] = strdup(json_object_get_string(e))))
            BAD(pa, "stop", "out_of_memory", "coordinator out of memory");
        pa->n_stops++;
    }
    return 0;
}

static int take_prompt(struct parsed *pa, struct json_object *v) {
    enum json_type t = json_object_get_type(v);
    if (t == json_type_string) {
        pa->in.prompt = json_object_get_string(v);
        pa->in.prompt_len = (size_t)json_object_get_string_len(v);
        return 0;
    }
    if (t != json_type_array)
        BAD(pa, "prompt", "invalid_type", "prompt must be a string or an array of token ids");
    size_t n = json_object_array_length(v);
    if (n == 0)
        BAD(pa, "prompt", "invalid_value", "empty prompt");
    struct json_object *first = json_object_array_get_idx(v, 0);
    enum json_type ft = json_object_get_type(first);
    if (ft == json_type_string || ft == json_type_array) {
        /* A batch of prompts: one is the same as the prompt itself. */
        if (n > 1)
            BAD(pa, "prompt", "unsupported_value",
                "a batch of %zu prompts is not supported: send one prompt per "
                "request",
                n);
        return take_prompt(pa, first);
    }
    if (!(pa->ids = malloc(n * sizeof *pa->ids)))
        BAD(pa, "prompt", "out_of_memory", "coordinator out of memory");
    for (size_t i = 0; i < n; i++) {
        struct json_object *e = json_object_array_get_idx(v, i);
        if (json_object_get_type(e) != json_type_int)
            BAD(pa, "prompt", "invalid_type", "prompt[%zu] must be a token id (an integer)", i);
        pa->ids[i] = json_object_get_int64(e);
    }
    pa->in.prompt_tokens64 = pa->ids;
    pa->in.n_prompt_tokens = n;
    return 0;
}

/* The text of one message's content: a string, or an array of {"type": "text", "text"}. */
static int message_text(struct parsed *pa, size_t i, struct json_object *m, struct sbuf *out) {
    struct json_object *c = NULL;
    json_object_object_get_ex(m, "content", &c);
    if (is_null(c))
        return 0;
    if (json_object_get_type(c) == json_type_string) {
        const char *s = json_object_get_string(c);
        size_t n = (size_t)json_object_get_string_len(c);
        if (memchr(s, '\0', n))
            BAD(pa, "messages", "invalid_value", "messages[%zu].content contains a NUL character",
                i);
        sb_add(out, s, n);
        return 0;
    }
    if (json_object_get_type(c) != json_type_array)
        BAD(pa, "messages", "invalid_type",
            "messages[%zu].content must be a string or an array of text parts", i);
    for (size_t k = 0; k < json_object_array_length(c); k++) {
        struct json_object *part = json_object_array_get_idx(c, k), *type = NULL, *text = NULL;
        if (json_object_get_type(part) != json_type_object ||
            !json_object_object_get_ex(part, "type", &type) ||
            json_object_get_type(type) != json_type_string ||
            strcmp(json_object_get_string(type), "text") != 0 ||
            !json_object_object_get_ex(part, "text", &text) ||
            json_object_get_type(text) != json_type_string)
            BAD(pa, "messages", "unsupported_value",
                "messages[%zu].content[%zu]: only {\"type\": \"text\", \"text\": ...} parts are "
                "supported",
                i, k);
        const char *s = json_object_get_string(text);
        size_t n = (size_t)json_object_get_string_len(text);
        if (memchr(s, '\0', n))
            BAD(pa, "messages", "invalid_value", "messages[%zu].content contains a NUL character",
                i);
        sb_add(out, s, n);
    }
    return 0;
}

/* s without leading and trailing white space (Meta's reference strips each message). */
static void trim(const char **s, size_t *n) {
    while (*n && (**s == ' ' || **s == '\n' || **s == '\t' || **s == '\r'))
        (*s)++, (*n)--;
    while (*n && ((*s)[*n - 1] == ' ' || (*s)[*n - 1] == '\n' || (*s)[*n - 1] == '\t' ||
                  (*s)[*n - 1] == '\r'))
        (*n)--;
}

/* Appends the ids of text (bos/eos as Meta's reference tokenizes each turn) to pa->ids. */
static int encode_turn(struct parsed *pa, const struct coord_http *h, const struct sbuf *text,
                       int bos, int eos, size_t *n_ids, size_t *cap) {
    int max = (int)text->n + 3;
    int *tmp = malloc((size_t)max * sizeof *tmp);
    if (!tmp)
        BAD(pa, "messages", "out_of_memory", "coordinator out of memory");
    int n = 0;
    int rc = kvr_tokenizer_encode(h->tok, text->p ? text->p : "", bos, eos, tmp, max, &n);
    if (rc != KVR_OK) {
        free(tmp);
        BAD(pa, "messages", "invalid_value", "cannot tokenize the messages: %s",
            kvr_status_str(rc));
    }
    if (*n_ids + (size_t)n > *cap) {
        size_t c = (*cap ? *cap * 2 : 256);
        while (c < *n_ids + (size_t)n)
            c *= 2;
        int64_t *p = realloc(pa->ids, c * sizeof *p);
        if (!p) {
            free(tmp);
            BAD(pa, "messages", "out_of_memory", "coordinator out of memory");
        }
        pa->ids = p;
        *cap = c;
    }
    for (int i = 0; i < n; i++)
        pa->ids[(*n_ids)++] = tmp[i];
    free(tmp);
    return 0;
}

/* messages -> a prompt under template tpl (docs/API.md, "Chat templates"). */
static int take_messages(struct parsed *pa, const struct coord_http *h, struct json_object *v,
                         int tpl) {
    if (json_object_get_type(v) != json_type_array || json_object_array_length(v) == 0)
        BAD(pa, "messages", "invalid_value", "messages must be a non-empty array");
    size_t n = json_object_array_length(v);
    size_t total = 0;
    for (size_t i = 0; i < n; i++) {
        struct json_object *m = json_object_array_get_idx(v, i), *role = NULL;
        if (json_object_get_type(m) != json_type_object)
            BAD(pa, "messages", "invalid_type", "messages[%zu] must be an object", i);
        struct json_object_iterator it = json_object_iter_begin(m), end = json_object_iter_end(m);
        for (; !json_object_iter_equal(&it, &end); json_object_iter_next(&it)) {
            const char *k = json_object_iter_peek_name(&it);
            if (strcmp(k, "role") && strcmp(k, "content") && strcmp(k, "name"))
                BAD(pa, "messages", "unsupported_field", "messages[%zu].%s is not supported", i, k);
        }
        if (!json_object_object_get_ex(m, "role", &role) ||
            json_object_get_type(role) != json_type_string)
            BAD(pa, "messages", "invalid_value", "messages[%zu].role must be a string", i);
        const char *r = json_object_get_string(role);
        if (strcmp(r, "system") && strcmp(r, "user") && strcmp(r, "assistant"))
            BAD(pa, "messages", "invalid_value",
                "messages[%zu].role must be system, user or assistant (got %.32s)", i, r);
        struct json_object *c = NULL;
        if (json_object_object_get_ex(m, "content", &c) &&
            json_object_get_type(c) == json_type_string)
            total += (size_t)json_object_get_string_len(c);
    }
    /* A token covers at most max_piece_len bytes: longer text is over the context without
     * tokenizing it (BPE is quadratic). */
    if (total > (size_t)h->seq_len * (size_t)h->req_ctx.max_piece_len)
        BAD(pa, "messages", "context_length_exceeded",
            "messages of %zu bytes are over the model context of %d tokens", total, h->seq_len);

    struct sbuf sys = {0}, turn = {0}, msg = {0};
    size_t n_ids = 0, cap = 0;
    int rc = -1;
    size_t i = 0;
#define BADM(...)                                                                                  \
    do {                                                                                           \
        snprintf(pa->param, sizeof pa->param, "messages");                                         \
        snprintf(pa->err, sizeof pa->err, __VA_ARGS__);                                            \
        pa->ecode = "invalid_value";                                                               \
        goto out;                                                                                  \
    } while (0)
    if (tpl == COORD_CHAT_LLAMA2) {
        /* Meta's chat_completion: an optional system message folded into the first user
         * message; then user/assistant pairs, each "[INST] u [/INST] a" between BOS and EOS;
         * the last user message "[INST] u [/INST]" after a BOS. */
        struct json_object *m0 = json_object_array_get_idx(v, 0), *r0 = NULL;
        json_object_object_get_ex(m0, "role", &r0);
        if (!strcmp(json_object_get_string(r0), "system")) {
            if (message_text(pa, 0, m0, &msg))
                goto out;
            const char *s = msg.p ? msg.p : "";
            size_t sn = msg.n;
            trim(&s, &sn);
            sb_puts(&sys, "<<SYS>>\n");
            sb_add(&sys, s, sn);
            sb_puts(&sys, "\n<</SYS>>\n\n");
            msg.n = 0;
            i = 1;
        }
        if (i >= n)
            BADM("messages must contain a user message after the system message");
        for (size_t k = 0; i < n; i++, k++) {
            struct json_object *m = json_object_array_get_idx(v, i), *role = NULL;
            json_object_object_get_ex(m, "role", &role);
            const char *want = (k % 2 == 0) ? "user" : "assistant";
            if (strcmp(json_object_get_string(role), want))
                BADM("messages[%zu] must be from the %s: the llama2 template needs an optional "
                     "system message, then "
                     "user and assistant in turn, ending with the user",
                     i, want);
            msg.n = 0;
            if (message_text(pa, i, m, &msg))
                goto out;
            const char *s = msg.p ? msg.p : "";
            size_t sn = msg.n;
            trim(&s, &sn);
            if (k % 2 == 0) {
                turn.n = 0;
                sb_puts(&turn, "[INST] ");
                if (k == 0 && sys.n)
                    sb_add(&turn, sys.p, sys.n);
                sb_add(&turn, s, sn);
                sb_puts(&turn, " [/INST]");
                if (i == n - 1 && encode_turn(pa, h, &turn, 1, 0, &n_ids, &cap))
                    goto out;
            } else {
                sb_puts(&turn, " ");
                sb_add(&turn, s, sn);
                sb_puts(&turn, " ");
                if (turn.oom)
                    BADM("coordinator out of memory");
                if (encode_turn(pa, h, &turn, 1, 1, &n_ids, &cap))
                    goto out;
                if (i == n - 1)
                    BADM("the last message must be from the user");
            }
        }
        pa->in.prompt_tokens64 = pa->ids;
        pa->in.n_prompt_tokens = n_ids;
    } else {
        for (; i < n; i++) {
            struct json_object *m = json_object_array_get_idx(v, i), *role = NULL;
            json_object_object_get_ex(m, "role", &role);
            msg.n = 0;
            if (message_text(pa, i, m, &msg))
                goto out;
            if (tpl == COORD_CHAT_CHATML) {
                sb_printf(&pa->prompt, "<|im_start|>%s\n", json_object_get_string(role));
                sb_add(&pa->prompt, msg.p ? msg.p : "", msg.n);
                sb_puts(&pa->prompt, "<|im_end|>\n");
            } else {
                if (i > 0)
                    sb_puts(&pa->prompt, "\n");
                sb_add(&pa->prompt, msg.p ? msg.p : "", msg.n);
            }
        }
        if (tpl == COORD_CHAT_CHATML)
            sb_puts(&pa->prompt, "<|im_start|>assistant\n");
        if (pa->prompt.oom)
            BADM("coordinator out of memory");
        pa->in.prompt = pa->prompt.p;
        pa->in.prompt_len = pa->prompt.n;
    }
#undef BADM
    rc = 0;
out:
    sb_free(&sys);
    sb_free(&turn);
    sb_free(&msg);
    return rc;
}

static const char *const template_names[] = {"llama2", "chatml", "plain"};

int coord_chat_template_from_name(const char *name) {
    for (int i = 0; i < (int)(sizeof template_names / sizeof template_names[0]); i++)
        if (name && !strcmp(name, template_names[i]))
            return i;
    return -1;
}

/* Fields each endpoint reads; everything else is refused by name. */
static int known_field(int chat, const char *k) {
    static const char *const common[] = {"model",
                                         "max_tokens",
                                         "temperature",
                                         "top_p",
                                         "seed",
                                         "stop",
                                         "stream",
                                         "stream_options",
                                         "ignore_eos",
                                         "kv_policy",
                                         "kv_window",
                                         "kv_sinks",
                                         "n",
                                         "logprobs",
                                         "user",
                                         "presence_penalty",
                                         "frequency_penalty",
                                         "logit_bias"};
    static const char *const comp[] = {"prompt", "echo", "best_of", "suffix"};
    static const char *const chat_only[] = {"messages", "max_completion_tokens", "top_logprobs",
                                            "chat_template"};
    for (size_t i = 0; i < sizeof common / sizeof common[0]; i++)
        if (!strcmp(k, common[i]))
            return 1;
    if (!chat) {
        for (size_t i = 0; i < sizeof comp / sizeof comp[0]; i++)
            if (!strcmp(k, comp[i]))
                return 1;
    } else {
        for (size_t i = 0; i < sizeof chat_only / sizeof chat_only[0]; i++)
            if (!strcmp(k, chat_only[i]))
                return 1;
    }
    return 0;
}

/* Reads the JSON object root of a /v1/completions (chat 0) or /v1/chat/completions (chat
 * 1) body into pa. 0, or -1 with pa->err, pa->param, pa->ecode and pa->code. */
static int parse_request(struct coord_http *h, int chat, struct json_object *root,
                         struct parsed *pa) {
    pa->chat = chat;
    pa->code = 400;
    if (json_object_get_type(root) != json_type_object)
        BAD(pa, "", "invalid_type", "the request body must be a JSON object");
    struct json_object_iterator it = json_object_iter_begin(root), end = json_object_iter_end(root);
    for (; !json_object_iter_equal(&it, &end); json_object_iter_next(&it)) {
        const char *k = json_object_iter_peek_name(&it);
        if (!known_field(chat, k))
            BAD(pa, k, "unsupported_field", "unknown field %.48s", k);
    }
    struct json_object *v;
#define FIELD(name) (json_object_object_get_ex(root, (name), &v) && !is_null(v))

    /* Refused options: accepted only at the value that means "off". */
    if (FIELD("n")) {
        int64_t n;
        if (get_int(pa, "n", v, &n))
            return -1;
        if (n != 1)
            BAD(pa, "n", "unsupported_value",
                "n = %" PRId64 " is not supported: kvrelay returns one choice (n = 1)", n);
    }
    if (FIELD("best_of")) {
        int64_t n;
        if (get_int(pa, "best_of", v, &n))
            return -1;
        if (n != 1)
            BAD(pa, "best_of", "unsupported_value", "best_of is not supported (only 1)");
    }
    if (FIELD("logprobs")) {
        if (chat) {
            int b;
            if (get_bool(pa, "logprobs", v, &b))
                return -1;
            if (b)
                BAD(pa, "logprobs", "unsupported_value", "logprobs are not supported");
        } else {
            BAD(pa, "logprobs", "unsupported_value", "logprobs are not supported");
        }
    }
    if (FIELD("top_logprobs"))
        BAD(pa, "top_logprobs", "unsupported_value", "top_logprobs are not supported");
    if (FIELD("echo")) {
        int b;
        if (get_bool(pa, "echo", v, &b))
            return -1;
        if (b)
            BAD(pa, "echo", "unsupported_value", "echo is not supported");
    }
    if (FIELD("suffix")) {
        if (json_object_get_type(v) != json_type_string || json_object_get_string_len(v) > 0)
            BAD(pa, "suffix", "unsupported_value", "suffix is not supported");
    }
    static const char *const penalties[] = {"presence_penalty", "frequency_penalty"};
    for (int i = 0; i < 2; i++) {
        if (FIELD(penalties[i])) {
            double x;
            if (get_num(pa, penalties[i], v, &x))
                return -1;
            if (x != 0.0)
                BAD(pa, penalties[i], "unsupported_value", "%s is not supported (only 0)",
                    penalties[i]);
        }
    }
    if (FIELD("logit_bias")) {
        if (json_object_get_type(v) != json_type_object || json_object_object_length(v) > 0)
            BAD(pa, "logit_bias", "unsupported_value", "logit_bias is not supported");
    }
    if (FIELD("user") && json_object_get_type(v) != json_type_string)
        BAD(pa, "user", "invalid_type", "user must be a string");

    if (FIELD("model")) {
        if (json_object_get_type(v) != json_type_string)
            BAD(pa, "model", "invalid_type", "model must be a string");
        if (strcmp(json_object_get_string(v), h->model_name) != 0) {
            pa->code = 404;
            BAD(pa, "model", "model_not_found",
                "the model '%.64s' does not exist; this server serves '%.64s'",
                json_object_get_string(v), h->model_name);
        }
    }
    int64_t i64;
    double d;
    int b;
    const char *mt =
        chat && json_object_object_get_ex(root, "max_completion_tokens", &v) && !is_null(v)
            ? "max_completion_tokens"
            : "max_tokens";
    if (FIELD(mt)) {
        if (get_int(pa, mt, v, &i64))
            return -1;
        if (i64 < 1)
            BAD(pa, mt, "invalid_value", "%s must be at least 1 (got %" PRId64 ")", mt, i64);
        pa->in.max_tokens = (struct coord_opt_i64){1, i64};
    } else if (!chat) {
        pa->in.max_tokens = (struct coord_opt_i64){1, HTTP_COMPLETION_MAX_TOKENS};
    }
    if (FIELD("temperature")) {
        if (get_num(pa, "temperature", v, &d))
            return -1;
        pa->in.temperature = (struct coord_opt_f64){1, d};
    }
    if (FIELD("top_p")) {
        if (get_num(pa, "top_p", v, &d))
            return -1;
        if (d <= 0.0)
            BAD(pa, "top_p", "invalid_value", "top_p must be in (0, 1]");
        pa->in.top_p = (struct coord_opt_f64){1, d};
    }
    if (FIELD("seed")) {
        if (get_int(pa, "seed", v, &i64))
            return -1;
        pa->in.has_seed = 1;
        pa->in.seed = (uint64_t)i64;
    }
    if (FIELD("ignore_eos")) {
        if (get_bool(pa, "ignore_eos", v, &b))
            return -1;
        pa->in.has_ignore_eos = 1;
        pa->in.ignore_eos = b;
    }
    if (FIELD("kv_policy")) {
        if (json_object_get_type(v) != json_type_string)
            BAD(pa, "kv_policy", "invalid_type",
                "kv_policy must be a string: dense, window, recompute or sink");
        const char *s = json_object_get_string(v);
        static const char *const pol[] = {"dense", "window", "recompute", "sink"};
        static const enum kvr_kv_policy pv[] = {KVR_KV_DENSE, KVR_KV_WINDOW, KVR_KV_RECOMPUTE,
                                                KVR_KV_SINK};
        int found = -1;
        for (int k = 0; k < 4; k++)
            if (!strcmp(s, pol[k]))
                found = k;
        if (found < 0)
            BAD(pa, "kv_policy", "invalid_value",
                "kv_policy must be dense, window, recompute or sink (got %.32s)", s);
        pa->in.kv_policy = (struct coord_opt_i64){1, (int64_t)pv[found]};
    }
    if (FIELD("kv_window")) {
        if (get_int(pa, "kv_window", v, &i64))
            return -1;
        pa->in.kv_window = (struct coord_opt_i64){1, i64};
    }
    if (FIELD("kv_sinks")) {
        if (get_int(pa, "kv_sinks", v, &i64))
            return -1;
        pa->in.kv_sinks = (struct coord_opt_i64){1, i64};
    }
    if (FIELD("stop") && take_stop(pa, v))
        return -1;
    if (FIELD("stream") && get_bool(pa, "stream", v, &pa->stream))
        return -1;
    if (FIELD("stream_options")) {
        if (!pa->stream)
            BAD(pa, "stream_options", "invalid_value",
                "stream_options is only allowed with stream: true");
        if (json_object_get_type(v) != json_type_object)
            BAD(pa, "stream_options", "invalid_type", "stream_options must be an object");
        struct json_object_iterator si = json_object_iter_begin(v), se = json_object_iter_end(v);
        for (; !json_object_iter_equal(&si, &se); json_object_iter_next(&si)) {
            const char *k = json_object_iter_peek_name(&si);
            if (strcmp(k, "include_usage") != 0)
                BAD(pa, "stream_options", "unsupported_field",
                    "stream_options.%.32s is not supported", k);
        }
        struct json_object *iu;
        if (json_object_object_get_ex(v, "include_usage", &iu) && !is_null(iu) &&
            get_bool(pa, "stream_options.include_usage", iu, &pa->include_usage))
            return -1;
    }
    if (chat) {
        int tpl = (int)h->chat_template;
        if (FIELD("chat_template")) {
            if (json_object_get_type(v) != json_type_string ||
                (tpl = coord_chat_template_from_name(json_object_get_string(v))) < 0)
                BAD(pa, "chat_template", "invalid_value",
                    "chat_template must be llama2, chatml or plain");
        }
        if (!FIELD("messages"))
            BAD(pa, "messages", "missing_field", "messages is required");
        if (take_messages(pa, h, v, tpl))
            return -1;
    } else {
        if (!FIELD("prompt"))
            BAD(pa, "prompt", "missing_field", "prompt is required");
        if (take_prompt(pa, v))
            return -1;
    }
#undef FIELD
    return 0;
}

/* ---------------------------------------------------------------------------------------
 * Following a generation (connection thread)
 * ------------------------------------------------------------------------------------- */

/* Whether the client hung up (its socket reads end-of-file or fails). */
static int client_gone(int fd) {
    if (fd < 0)
        return 0;
    struct pollfd p = {.fd = fd, .events = POLLIN};
    if (poll(&p, 1, 0) <= 0)
        return 0;
    if (p.revents & (POLLHUP | POLLERR | POLLNVAL))
        return 1;
    if (p.revents & POLLIN) {
        char c;
        ssize_t k = recv(fd, &c, 1, MSG_PEEK | MSG_DONTWAIT);
        return k == 0 || (k < 0 && errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR);
    }
    return 0;
}

static void cancel(struct http_req *r) {
    if (r->submitted && !r->ended)
        coord_router_cancel(r->h->router, r->id);
}

/* Takes the tokens that arrived into the text, applies the stop strings (cancelling the
 * request at the first match) and the finish. Returns 1 if anything changed. */
static int take_events(struct http_req *r) {
    int ids[256];
    int n = 0, fin = 0, oom = 0;
    pthread_mutex_lock(&r->mu);
    n = r->q_n < 256 ? r->q_n : 256;
    if (n > 0) { /* q is NULL until the first token */
        memcpy(ids, r->q, (size_t)n * sizeof *ids);
        memmove(r->q, r->q + n, (size_t)(r->q_n - n) * sizeof *r->q);
    }
    r->q_n -= n;
    oom = r->q_oom;
    if (r->q_n == 0 && r->finished && !r->ended) {
        fin = 1;
        r->ended = 1;
        r->status = r->fin_status;
        r->reason = r->fin_reason;
        r->usage = r->fin_usage;
        memcpy(r->msg, r->fin_msg, sizeof r->msg);
    }
    pthread_mutex_unlock(&r->mu);
    if (oom && !r->ended && !r->stop_hit) {
        r->stop_hit = -1; /* out of memory: cancel, report an error */
        coord_router_cancel(r->h->router, r->id);
    }
    for (int i = 0; i < n && !r->stop_hit; i++) {
        size_t before = r->text.n;
        sb_puts(&r->text, kvr_tokenizer_piece_safe(r->h->tok, r->prev, ids[i]));
        r->prev = ids[i];
        r->n_completion++;
        if (r->n_stops == 0)
            continue;
        size_t from = before > r->stop_max ? before - r->stop_max + 1 : 0, cut = SIZE_MAX;
        for (int k = 0; k < r->n_stops; k++) {
            size_t L = strlen(r->stops[k]);
            for (size_t p = from; p + L <= r->text.n; p++)
                if (!memcmp(r->text.p + p, r->stops[k], L)) {
                    if (p < cut)
                        cut = p;
                    break;
                }
        }
        if (cut != SIZE_MAX) {
            r->text.n = cut;
            r->stop_hit = 1;
            r->head.stopped_by_text = 1; /* before the cancel: the router reads it at finish */
            if (!r->ended)
                coord_router_cancel(r->h->router, r->id);
        }
    }
    return n > 0 || fin;
}

/* Whether the text will not change any more (the request ended or a stop string hit). */
static int text_final(const struct http_req *r) {
    return r->ended || r->stop_hit;
}

/* The end of the text that may go out now: all of it once final; before that, never the
 * last stop_max - 1 bytes (they may begin a stop string) nor a cut UTF-8 sequence. */
static size_t safe_end(const struct http_req *r) {
    if (text_final(r))
        return r->text.n;
    size_t end = r->text.n;
    if (r->stop_max > 1)
        end = end > r->stop_max - 1 ? end - (r->stop_max - 1) : 0;
    /* Back off to the start of an incomplete (or continuing) UTF-8 sequence. */
    size_t k = end;
    int back = 0;
    while (k > 0 && back < 4 && ((unsigned char)r->text.p[k - 1] & 0xc0) == 0x80)
        k--, back++;
    if (k > 0 && ((unsigned char)r->text.p[k - 1] & 0x80)) {
        size_t lead = k - 1;
        if (utf8_len((const unsigned char *)r->text.p + lead, end - lead) == 0 && end - lead < 4 &&
            ((unsigned char)r->text.p[lead] & 0xc0) == 0xc0)
            end = lead; /* cut: wait for the rest */
    }
    return end < r->sent ? r->sent : end;
}

/* Waits until the router reports something, the client leaves or the server stops. Returns
 * 0 when there is something to take, -1 when the client is gone or the server stops (the
 * request is cancelled then). */
static int wait_events(struct http_req *r) {
    for (;;) {
        pthread_mutex_lock(&r->mu);
        int ready = r->q_n > 0 || r->finished || r->q_oom;
        if (!ready) {
            struct timespec until;
            clock_gettime(CLOCK_MONOTONIC, &until);
            until.tv_nsec += HTTP_WAIT_MS * 1000000L;
            if (until.tv_nsec >= 1000000000L) {
                until.tv_sec++;
                until.tv_nsec -= 1000000000L;
            }
            pthread_cond_timedwait(&r->cv, &r->mu, &until);
            ready = r->q_n > 0 || r->finished || r->q_oom;
        }
        pthread_mutex_unlock(&r->mu);
        /* The socket is checked at every wake-up: each token of a live stream is one, so a
         * client that left is noticed at the next decode step. */
        if (client_gone(r->fd)) {
            KVR_LOG_INFO("req=%llu: the HTTP client went away; cancelling",
                         (unsigned long long)r->id);
            cancel(r);
            return -1;
        }
        if (ready)
            return 0;
        if (atomic_load(&r->h->stopping)) {
            cancel(r);
            return -1;
        }
    }
}

static const char *finish_name(const struct http_req *r) {
    if (r->stop_hit > 0)
        return "stop";
    return r->reason == COORD_FINISH_STOP ? "stop" : "length";
}

/* Whether the request ended well (a finish reason, not an error). */
static int ended_ok(const struct http_req *r) {
    if (r->stop_hit > 0)
        return 1;
    return r->stop_hit == 0 && r->status == KVR_OK &&
           (r->reason == COORD_FINISH_STOP || r->reason == COORD_FINISH_LENGTH ||
            r->reason == COORD_FINISH_CONTEXT);
}

/* The error of a request that did not end well: HTTP code, code string and message. */
static void ended_error(const struct http_req *r, unsigned *code, const char **ecode,
                        const char **msg) {
    if (r->stop_hit < 0) {
        *code = 503, *ecode = "out_of_memory", *msg = "coordinator out of memory";
        return;
    }
    if (r->status != KVR_OK) {
        status_to_http(r->status, code, ecode);
        *msg = r->msg[0] ? r->msg : kvr_status_str(r->status);
        return;
    }
    *code = 503, *ecode = "cancelled";
    *msg = r->msg[0] ? r->msg : "the request was cancelled by the cluster";
}

static void usage_json(struct sbuf *b, const struct http_req *r) {
    int p = r->usage.prompt_tokens > 0 ? r->usage.prompt_tokens : r->n_prompt;
    sb_printf(b, "{\"prompt_tokens\":%d,\"completion_tokens\":%d,\"total_tokens\":%d}", p,
              r->n_completion, p + r->n_completion);
}

static void chunk_head(struct sbuf *b, const struct http_req *r) {
    sb_printf(b, "data: {\"id\":\"%s\",\"object\":\"%s\",\"created\":%lld,\"model\":", r->rid,
              r->chat ? "chat.completion.chunk" : "text_completion", (long long)r->created);
    sb_json_cstr(b, r->h->model_name);
}

/* One SSE event carrying text[from, to) (or, with fin, the finish reason). */
static void chunk_text(struct http_req *r, size_t from, size_t to, const char *fin) {
    struct sbuf *b = &r->out;
    chunk_head(b, r);
    sb_puts(b, ",\"choices\":[{\"index\":0,");
    if (r->chat) {
        sb_puts(b, "\"delta\":{");
        int comma = 0;
        if (!r->role_sent) {
            sb_puts(b, "\"role\":\"assistant\"");
            r->role_sent = 1;
            comma = 1;
        }
        if (!fin || to > from) {
            if (comma)
                sb_puts(b, ",");
            sb_puts(b, "\"content\":");
            sb_json_str(b, r->text.p + from, to - from);
        }
        sb_puts(b, "}");
    } else {
        sb_puts(b, "\"text\":");
        sb_json_str(b, r->text.p ? r->text.p + from : "", to - from);
    }
    sb_puts(b, ",\"logprobs\":null,\"finish_reason\":");
    if (fin)
        sb_json_cstr(b, fin);
    else
        sb_puts(b, "null");
    sb_puts(b, "}]");
    if (r->include_usage)
        sb_puts(b, ",\"usage\":null");
    sb_puts(b, "}\n\n");
}

/* Appends to r->out what the client may see now; sets r->done after the last event. */
static void stream_produce(struct http_req *r) {
    size_t end = safe_end(r);
    if (r->chat && !r->role_sent) {
        chunk_text(r, 0, 0, NULL); /* the role first, as OpenAI does */
    }
    if (end > r->sent) {
        chunk_text(r, r->sent, end, NULL);
        r->sent = end;
    }
    if (!text_final(r) || r->final_sent)
        return;
    /* Final: a stop string hit is final at once (the router's CANCELLED end is not waited
     * for); otherwise the router's end decides between a finish reason and an error. */
    if (r->stop_hit == 0 && !r->ended)
        return;
    r->final_sent = 1;
    if (ended_ok(r)) {
        chunk_text(r, r->sent, r->sent, finish_name(r));
        if (r->include_usage) {
            chunk_head(&r->out, r);
            sb_puts(&r->out, ",\"choices\":[],\"usage\":");
            usage_json(&r->out, r);
            sb_puts(&r->out, "}\n\n");
        }
        sb_puts(&r->out, "data: [DONE]\n\n");
    } else {
        unsigned code;
        const char *ecode, *msg;
        ended_error(r, &code, &ecode, &msg);
        sb_puts(&r->out, "data: ");
        error_json(&r->out, code, msg, NULL, ecode);
        sb_puts(&r->out, "\n\n");
        KVR_LOG_INFO("req=%llu: error after the stream began: %s", (unsigned long long)r->id, msg);
    }
    r->done = 1;
}

static ssize_t stream_reader(void *cls, uint64_t pos, char *buf, size_t max) {
    (void)pos;
    struct http_req *r = cls;
    while (r->out_off >= r->out.n) {
        r->out.n = 0;
        r->out_off = 0;
        if (r->done)
            return MHD_CONTENT_READER_END_OF_STREAM;
        if (r->out.oom) {
            cancel(r);
            return MHD_CONTENT_READER_END_WITH_ERROR;
        }
        /* What arrived already first (the handler took the first token before the
         * headers went out), then wait for more. */
        stream_produce(r);
        if (r->out.n > 0)
            break;
        if (text_final(r)) /* stream_produce ends a final text: not reached */
            return MHD_CONTENT_READER_END_WITH_ERROR;
        if (wait_events(r) < 0)
            return MHD_CONTENT_READER_END_WITH_ERROR;
        take_events(r);
    }
    size_t k = r->out.n - r->out_off < max ? r->out.n - r->out_off : max;
    memcpy(buf, r->out.p + r->out_off, k);
    r->out_off += k;
    return (ssize_t)k;
}

static void stream_free(void *cls) {
    struct http_req *r = cls;
    /* The response is gone (sent, or the client left): nothing more will be read. */
    if (r->submitted && !r->final_sent)
        cancel(r);
    req_unref(r);
}

/* ---------------------------------------------------------------------------------------
 * Endpoints
 * ------------------------------------------------------------------------------------- */

/* The request field a refusal of the request module is about (its messages name it, see
 * request.c), as the HTTP request calls it; NULL when none. */
static const char *module_param(const char *err, int chat) {
    const char *prompt = chat ? "messages" : "prompt";
    if (strstr(err, "+ max_tokens") || !strncmp(err, "max_tokens", 10))
        return chat ? "max_tokens" : "max_tokens";
    if (!strncmp(err, "kv policy", 9))
        return strstr(err, "sinks") ? "kv_sinks" : "kv_window";
    static const char *const fields[] = {"temperature", "top_p", "kv_policy", "kv_window",
                                         "kv_sinks"};
    for (size_t i = 0; i < sizeof fields / sizeof fields[0]; i++)
        if (!strncmp(err, fields[i], strlen(fields[i])))
            return fields[i];
    if (!strncmp(err, "prompt", 6) || !strncmp(err, "empty prompt", 12) ||
        !strncmp(err, "cannot tokenize", 15))
        return prompt;
    return NULL;
}

static enum MHD_Result complete(struct coord_http *h, struct MHD_Connection *conn, int chat,
                                struct http_conn *hc) {
    if (hc->too_big) {
        char msg[128];
        snprintf(msg, sizeof msg, "the request body is over the limit of %zu bytes", h->max_body);
        coord_metrics_reject(h->metrics, COORD_REJECT_INVALID);
        return respond_error(conn, 400, msg, NULL, "body_too_large");
    }
    struct json_tokener *tk = json_tokener_new_ex(64);
    if (!tk)
        return respond_error(conn, 503, "coordinator out of memory", NULL, "out_of_memory");
    struct json_object *root = NULL;
    const char *body = hc->body.p ? hc->body.p : "";
    root = json_tokener_parse_ex(tk, body, (int)hc->body.n);
    enum json_tokener_error je = json_tokener_get_error(tk);
    size_t end = json_tokener_get_parse_end(tk);
    json_tokener_free(tk);
    while (root && end < hc->body.n && strchr(" \t\r\n", body[end]))
        end++;
    if (!root || je != json_tokener_success || end != hc->body.n) {
        char msg[160];
        if (!root && je == json_tokener_continue)
            snprintf(msg, sizeof msg, "the request body is not valid JSON: it ends early");
        else if (!root || je != json_tokener_success)
            snprintf(msg, sizeof msg, "the request body is not valid JSON: %s at byte %zu",
                     json_tokener_error_desc(je), end);
        else
            snprintf(msg, sizeof msg,
                     "the request body is not valid JSON: text after the value at byte %zu", end);
        json_object_put(root);
        coord_metrics_reject(h->metrics, COORD_REJECT_INVALID);
        return respond_error(conn, 400, msg, NULL, "invalid_json");
    }

    struct parsed pa;
    memset(&pa, 0, sizeof pa);
    enum MHD_Result ret;
    if (parse_request(h, chat, root, &pa) != 0) {
        coord_metrics_reject(h->metrics, COORD_REJECT_INVALID);
        ret = respond_error(conn, pa.code, pa.err, pa.param[0] ? pa.param : NULL, pa.ecode);
        goto out;
    }
    struct coord_limits lim;
    struct coord_request req;
    char err[256] = "";
    int rc = coord_router_limits(h->router, &lim);
    if (rc == KVR_OK)
        rc = coord_request_build(&h->req_ctx, &pa.in, &lim, &req, err, sizeof err);
    coord_limits_deinit(&lim);
    if (rc != KVR_OK) {
        unsigned code;
        const char *ecode;
        status_to_http(rc, &code, &ecode);
        coord_metrics_reject(h->metrics, coord_reject_from_status(rc));
        const char *param = code == 400 ? module_param(err, chat) : NULL;
        ret = respond_error(conn, code, err[0] ? err : kvr_status_str(rc), param, ecode);
        goto out;
    }

    struct http_req *r = calloc(1, sizeof *r);
    if (!r) {
        free(req.tokens);
        ret = respond_error(conn, 503, "coordinator out of memory", NULL, "out_of_memory");
        goto out;
    }
    pthread_condattr_t ca;
    pthread_condattr_init(&ca);
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
    pthread_mutex_init(&r->mu, NULL);
    pthread_cond_init(&r->cv, &ca);
    pthread_condattr_destroy(&ca);
    r->refs = 1;
    r->h = h;
    r->chat = chat;
    r->stream = pa.stream;
    r->include_usage = pa.include_usage;
    r->n_prompt = req.n_tokens;
    r->prev = req.tokens[req.n_tokens - 1];
    r->created = time(NULL);
    unsigned long long serial = atomic_fetch_add(&h->serial, 1) + 1;
    snprintf(r->rid, sizeof r->rid, "%s-%llx%08llx", chat ? "chatcmpl" : "cmpl",
             (unsigned long long)r->created, serial);
    for (int i = 0; i < pa.n_stops; i++) {
        r->stops[i] = pa.stops[i];
        pa.stops[i] = NULL;
        size_t L = strlen(r->stops[i]);
        if (L > r->stop_max)
            r->stop_max = L;
    }
    r->n_stops = pa.n_stops;
    pa.n_stops = 0;
    const union MHD_ConnectionInfo *ci =
        MHD_get_connection_info(conn, MHD_CONNECTION_INFO_CONNECTION_FD);
    r->fd = ci ? ci->connect_fd : -1;
    if (req.seed == 0) {
        struct timespec ts;
        clock_gettime(CLOCK_REALTIME, &ts);
        req.seed = ((uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec) ^
                   (serial * 0x9E3779B97F4A7C15ull);
        if (!req.seed)
            req.seed = 1;
    }
    r->head.ops = &coord_http_stream_ops;
    r->head.metrics = h->metrics;
    r->head.t_arrival = kvr_clock_now();
    req.t_arrival = r->head.t_arrival;
    req.t_deadline = 0;
    req.stream = (struct coord_stream *)(void *)r;
    r->refs = 2; /* the router's, dropped by http_finish */
    uint64_t id = 0;
    rc = coord_router_submit(h->router, &req, &id);
    if (rc != KVR_OK) {
        r->refs = 1;
        unsigned code;
        const char *ecode;
        status_to_http(rc, &code, &ecode);
        coord_metrics_reject(h->metrics, coord_reject_from_status(rc));
        ret = respond_error(conn, code,
                            rc == KVR_EFULL ? "the admission queue is full; retry later"
                            : rc == KVR_EUNAVAIL
                                ? "the cluster is not serving (no nodes, or shutting down)"
                                : kvr_status_str(rc),
                            NULL, ecode);
        req_unref(r);
        goto out;
    }
    r->id = id;
    r->submitted = 1;

    /* Nothing goes out before the first token or the end: an error before then is an HTTP
     * status, as a client expects. */
    while (!r->ended && !r->stop_hit && r->text.n == 0 && r->n_completion == 0) {
        if (wait_events(r) < 0) {
            req_unref(r);
            ret = MHD_NO; /* the client is gone or the server stops: close */
            goto out;
        }
        take_events(r);
    }
    if (r->ended && !ended_ok(r) && r->n_completion == 0) {
        unsigned code;
        const char *ecode, *msg;
        ended_error(r, &code, &ecode, &msg);
        ret = respond_error(conn, code, msg, NULL, ecode);
        req_unref(r);
        goto out;
    }

    if (r->stream) {
        struct MHD_Response *res = MHD_create_response_from_callback(MHD_SIZE_UNKNOWN, 16384,
                                                                     stream_reader, r, stream_free);
        if (!res) {
            cancel(r);
            req_unref(r);
            ret = MHD_NO;
            goto out;
        }
        MHD_add_response_header(res, "Content-Type", "text/event-stream");
        MHD_add_response_header(res, "Cache-Control", "no-cache");
        MHD_add_response_header(res, "X-Accel-Buffering", "no");
        ret = MHD_queue_response(conn, MHD_HTTP_OK, res);
        MHD_destroy_response(res); /* stream_free runs when libmicrohttpd is done with it */
        goto out;
    }

    /* Not streaming: follow it to the end, then one JSON body. */
    while (!r->ended && r->stop_hit == 0) {
        if (wait_events(r) < 0) {
            req_unref(r);
            ret = MHD_NO;
            goto out;
        }
        take_events(r);
    }
    struct sbuf b = {0};
    if (!ended_ok(r)) {
        unsigned code;
        const char *ecode, *msg;
        ended_error(r, &code, &ecode, &msg);
        error_json(&b, code, msg, NULL, ecode);
        sb_puts(&b, "\n");
        ret = respond(conn, code, "application/json", &b);
    } else {
        sb_printf(&b, "{\"id\":\"%s\",\"object\":\"%s\",\"created\":%lld,\"model\":", r->rid,
                  chat ? "chat.completion" : "text_completion", (long long)r->created);
        sb_json_cstr(&b, h->model_name);
        sb_puts(&b, ",\"choices\":[{\"index\":0,");
        if (chat) {
            sb_puts(&b, "\"message\":{\"role\":\"assistant\",\"content\":");
            sb_json_str(&b, r->text.p ? r->text.p : "", r->text.n);
            sb_puts(&b, "}");
        } else {
            sb_puts(&b, "\"text\":");
            sb_json_str(&b, r->text.p ? r->text.p : "", r->text.n);
        }
        sb_puts(&b, ",\"logprobs\":null,\"finish_reason\":");
        sb_json_cstr(&b, finish_name(r));
        sb_puts(&b, "}],\"usage\":");
        usage_json(&b, r);
        sb_puts(&b, "}\n");
        ret = respond(conn, MHD_HTTP_OK, "application/json", &b);
    }
    sb_free(&b);
    req_unref(r);
out:
    parsed_free(&pa);
    json_object_put(root);
    return ret;
}

static enum MHD_Result get_health(struct coord_http *h, struct MHD_Connection *conn) {
    struct coord_cluster_status st;
    if (coord_router_status(h->router, &st) != KVR_OK)
        return respond_error(conn, 503, "coordinator out of memory", NULL, "out_of_memory");
    char why[256];
    int serving = coord_cluster_serving(&st, atomic_load(&h->stopping), why, sizeof why);
    coord_cluster_status_deinit(&st);
    if (!serving)
        return respond_error(conn, 503, why, NULL, "not_serving");
    struct sbuf b = {0};
    sb_puts(&b, "{\"status\":\"ok\",\"detail\":");
    sb_json_cstr(&b, why);
    sb_puts(&b, "}\n");
    enum MHD_Result ret = respond(conn, 200, "application/json", &b);
    sb_free(&b);
    return ret;
}

static enum MHD_Result get_metrics(struct coord_http *h, struct MHD_Connection *conn) {
    struct coord_cluster_status st;
    if (coord_router_status(h->router, &st) != KVR_OK)
        return respond_error(conn, 503, "coordinator out of memory", NULL, "out_of_memory");
    char *text = NULL;
    size_t len = 0;
    int rc = h->metrics ? coord_metrics_render(h->metrics, &st, &text, &len) : KVR_ENOTSUP;
    coord_cluster_status_deinit(&st);
    if (rc != KVR_OK)
        return respond_error(conn, rc == KVR_ENOTSUP ? 404 : 503, "metrics are not available", NULL,
                             "no_metrics");
    struct MHD_Response *res = MHD_create_response_from_buffer(len, text, MHD_RESPMEM_MUST_FREE);
    if (!res) {
        free(text);
        return MHD_NO;
    }
    MHD_add_response_header(res, "Content-Type", "text/plain; version=0.0.4; charset=utf-8");
    enum MHD_Result ret = MHD_queue_response(conn, 200, res);
    MHD_destroy_response(res);
    return ret;
}

static enum MHD_Result get_models(struct coord_http *h, struct MHD_Connection *conn) {
    struct sbuf b = {0};
    sb_puts(&b, "{\"object\":\"list\",\"data\":[{\"id\":");
    sb_json_cstr(&b, h->model_name);
    sb_printf(&b, ",\"object\":\"model\",\"created\":%lld,\"owned_by\":\"kvrelay\",\"root\":",
              (long long)h->created);
    sb_json_cstr(&b, h->model_name);
    sb_printf(&b, ",\"max_model_len\":%d}]}\n", h->seq_len);
    enum MHD_Result ret = respond(conn, 200, "application/json", &b);
    sb_free(&b);
    return ret;
}

static enum MHD_Result on_request(void *cls, struct MHD_Connection *conn, const char *url,
                                  const char *method, const char *version, const char *upload,
                                  size_t *upload_size, void **con_cls) {
    (void)version;
    struct coord_http *h = cls;
    struct http_conn *hc = *con_cls;
    if (!hc) {
        if (!(hc = calloc(1, sizeof *hc)))
            return MHD_NO;
        *con_cls = hc;
        /* A body announced over the limit is refused before it is read (and before a
         * client waiting on "Expect: 100-continue" sends it). */
        const char *cl =
            MHD_lookup_connection_value(conn, MHD_HEADER_KIND, MHD_HTTP_HEADER_CONTENT_LENGTH);
        if (cl && strtoull(cl, NULL, 10) > h->max_body) {
            hc->too_big = 1;
            char msg[128];
            snprintf(msg, sizeof msg, "the request body is over the limit of %zu bytes",
                     h->max_body);
            coord_metrics_reject(h->metrics, COORD_REJECT_INVALID);
            hc->answered = 1;
            return respond_error(conn, 400, msg, NULL, "body_too_large");
        }
        return MHD_YES;
    }
    if (hc->answered) {
        *upload_size = 0; /* the rest of a refused body: read and dropped */
        return MHD_YES;
    }
    if (*upload_size) {
        if (!hc->too_big) {
            if (hc->body.n + *upload_size > h->max_body) {
                hc->too_big = 1;
                sb_free(&hc->body);
            } else {
                sb_add(&hc->body, upload, *upload_size);
                if (hc->body.oom)
                    return MHD_NO;
            }
        }
        *upload_size = 0;
        return MHD_YES;
    }
    int is_get = !strcmp(method, "GET") || !strcmp(method, "HEAD");
    int is_post = !strcmp(method, "POST");
    static const struct {
        const char *path;
        int post;
    } routes[] = {{"/v1/completions", 1},
                  {"/v1/chat/completions", 1},
                  {"/v1/models", 0},
                  {"/health", 0},
                  {"/metrics", 0}};
    int route = -1;
    for (int i = 0; i < (int)(sizeof routes / sizeof routes[0]); i++)
        if (!strcmp(url, routes[i].path))
            route = i;
    if (route < 0) {
        char msg[160];
        snprintf(msg, sizeof msg, "no such endpoint: %.8s %.100s", method, url);
        return respond_error(conn, 404, msg, NULL, "unknown_url");
    }
    if (routes[route].post ? !is_post : !is_get) {
        char msg[128];
        snprintf(msg, sizeof msg, "%.100s takes %s", url, routes[route].post ? "POST" : "GET");
        return respond_error(conn, 405, msg, NULL, "method_not_allowed");
    }
    if (!strncmp(url, "/v1/", 4) && h->authorize) {
        const char *auth =
            MHD_lookup_connection_value(conn, MHD_HEADER_KIND, MHD_HTTP_HEADER_AUTHORIZATION);
        if (h->authorize(h->authorize_ctx, auth) != 0) {
            coord_metrics_reject(h->metrics, COORD_REJECT_UNAUTHENTICATED);
            struct sbuf b = {0};
            error_json(&b, 401,
                       auth ? "invalid bearer token" : "missing Authorization: Bearer <token>",
                       NULL, "invalid_api_key");
            sb_puts(&b, "\n");
            struct MHD_Response *res =
                MHD_create_response_from_buffer(b.n, b.p ? b.p : (char *)"", MHD_RESPMEM_MUST_COPY);
            sb_free(&b);
            if (!res)
                return MHD_NO;
            MHD_add_response_header(res, "Content-Type", "application/json");
            MHD_add_response_header(res, "WWW-Authenticate", "Bearer");
            enum MHD_Result ret = MHD_queue_response(conn, 401, res);
            MHD_destroy_response(res);
            return ret;
        }
    }
    switch (route) {
    case 0:
    case 1:
        return complete(h, conn, route == 1, hc);
    case 2:
        return get_models(h, conn);
    case 3:
        return get_health(h, conn);
    default:
        return get_metrics(h, conn);
    }
}

static void on_completed(void *cls, struct MHD_Connection *conn, void **con_cls,
                         enum MHD_RequestTerminationCode toe) {
    (void)cls;
    (void)conn;
    (void)toe;
    struct http_conn *hc = *con_cls;
    if (hc) {
        sb_free(&hc->body);
        free(hc);
        *con_cls = NULL;
    }
}

static void mhd_log(void *cls, const char *fmt, va_list ap) {
    (void)cls;
    char line[256];
    vsnprintf(line, sizeof line, fmt, ap);
    size_t n = strlen(line);
    while (n && (line[n - 1] == '\n' || line[n - 1] == '\r'))
        line[--n] = '\0';
    /* Mostly clients that left mid-response; our own errors are logged where they happen. */
    KVR_LOG_INFO("libmicrohttpd: %s", line);
}

/* ---------------------------------------------------------------------------------------
 * Start and stop
 * ------------------------------------------------------------------------------------- */

/* "HOST:PORT" or "[V6]:PORT" -> a socket address. */
static int parse_addr(const char *addr, struct sockaddr_storage *ss, socklen_t *len) {
    char host[256];
    const char *colon, *hs = addr;
    size_t hl;
    if (addr[0] == '[') {
        const char *rb = strchr(addr, ']');
        if (!rb || rb[1] != ':')
            return KVR_EINVAL;
        hs = addr + 1;
        hl = (size_t)(rb - hs);
        colon = rb + 1;
    } else {
        colon = strrchr(addr, ':');
        if (!colon)
            return KVR_EINVAL;
        hl = (size_t)(colon - addr);
    }
    if (hl == 0 || hl >= sizeof host)
        return KVR_EINVAL;
    memcpy(host, hs, hl);
    host[hl] = '\0';
    char *endp;
    long port = strtol(colon + 1, &endp, 10);
    if (!colon[1] || *endp || port < 0 || port > 65535)
        return KVR_EINVAL;
    struct addrinfo hints = {.ai_family = AF_UNSPEC,
                             .ai_socktype = SOCK_STREAM,
                             .ai_flags = AI_PASSIVE},
                    *res;
    char ps[16];
    snprintf(ps, sizeof ps, "%ld", port);
    if (getaddrinfo(host, ps, &hints, &res) != 0 || !res)
        return KVR_EINVAL;
    memcpy(ss, res->ai_addr, res->ai_addrlen);
    *len = res->ai_addrlen;
    freeaddrinfo(res);
    return KVR_OK;
}

int coord_http_start(const struct coord_http_params *p, struct coord_http **out) {
    *out = NULL;
    if (!p || !p->addr || !p->router || !p->tok || p->seq_len < 1 || p->vocab_size < 1 ||
        !p->model_name || (int)p->chat_template < 0 || p->chat_template > COORD_CHAT_PLAIN) {
        KVR_LOG_ERROR("bad parameters (addr, router, tokenizer, seq_len, vocab_size, model_name "
                      "are required)");
        return KVR_EINVAL;
    }
    struct sockaddr_storage ss;
    socklen_t sl = 0;
    memset(&ss, 0, sizeof ss);
    if (parse_addr(p->addr, &ss, &sl) != KVR_OK) {
        KVR_LOG_ERROR("cannot use '%s' as an HTTP listen address (HOST:PORT or [V6]:PORT)",
                      p->addr);
        return KVR_EINVAL;
    }
    struct coord_http *h = calloc(1, sizeof *h);
    if (!h || !(h->model_name = strdup(p->model_name))) {
        free(h);
        return KVR_ENOMEM;
    }
    h->router = p->router;
    h->tok = p->tok;
    h->seq_len = p->seq_len;
    h->vocab_size = p->vocab_size;
    h->chat_template = p->chat_template;
    h->metrics = p->metrics;
    h->max_body = p->max_body_bytes ? p->max_body_bytes : HTTP_DEFAULT_MAX_BODY;
    h->authorize = p->authorize;
    h->authorize_ctx = p->authorize_ctx;
    h->created = time(NULL);
    atomic_init(&h->stopping, 0);
    atomic_init(&h->serial, 0);
    coord_req_ctx_init(&h->req_ctx, p->tok, p->vocab_size);
    unsigned flags = MHD_USE_INTERNAL_POLLING_THREAD | MHD_USE_THREAD_PER_CONNECTION |
                     MHD_USE_ERROR_LOG | (ss.ss_family == AF_INET6 ? MHD_USE_IPv6 : 0);
    h->d = MHD_start_daemon(
        flags, 0, NULL, NULL, on_request, h, MHD_OPTION_EXTERNAL_LOGGER, mhd_log, h,
        MHD_OPTION_SOCK_ADDR, (struct sockaddr *)&ss, MHD_OPTION_NOTIFY_COMPLETED, on_completed, h,
        MHD_OPTION_CONNECTION_LIMIT, (unsigned)1024, MHD_OPTION_CONNECTION_TIMEOUT,
        (unsigned)HTTP_IDLE_S, MHD_OPTION_THREAD_STACK_SIZE, (size_t)(512 * 1024),
        MHD_OPTION_LISTENING_ADDRESS_REUSE, (unsigned)0, MHD_OPTION_END);
    if (!h->d) {
        KVR_LOG_ERROR("cannot listen on %s (address in use or invalid)", p->addr);
        free(h->model_name);
        free(h);
        return KVR_EIO;
    }
    const union MHD_DaemonInfo *di = MHD_get_daemon_info(h->d, MHD_DAEMON_INFO_BIND_PORT);
    h->port = di ? (int)di->port : 0;
    KVR_LOG_INFO("HTTP listening on %s (port %d), model '%s'", p->addr, h->port, h->model_name);
    *out = h;
    return KVR_OK;
}

int coord_http_port(const struct coord_http *h) {
    return h->port;
}

void coord_http_stop(struct coord_http *h) {
    if (!h)
        return;
    /* Waiting connections see stopping within HTTP_WAIT_MS and cancel their requests;
     * MHD_stop_daemon then closes the sockets and joins every connection's thread. */
    atomic_store(&h->stopping, 1);
    MHD_stop_daemon(h->d);
    free(h->model_name);
    free(h);
}
