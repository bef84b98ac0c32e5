/* golden.c - parses the llama2.c reference files of ../shared/golden for the engine's
 * tests (see golden.h). Plain stdio; every malformed field is reported, not assumed. */
#include "golden.h"

#include <errno.h>
#include <glob.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* Splits the numbers of s into a growing array of ints (as_float 0) or floats. */
static int parse_numbers(const char *path, const char *field, const char *s, int as_float,
                         void **out, int *n_out) {
    int cap = 64, n = 0;
    size_t elem = as_float ? sizeof(float) : sizeof(int);
    char *arr = malloc((size_t)cap * elem);
    if (!arr)
        return -1;
    const char *p = s;
    for (;;) {
        while (*p == ' ' || *p == '\t')
            p++;
        if (*p == '\0' || *p == '\n' || *p == '\r')
            break;
        char *end = NULL;
        int bad = 0;
        errno = 0;
        if (n == cap) {
            cap *= 2;
            char *grown = realloc(arr, (size_t)cap * elem);
            if (!grown) {
                free(arr);
                return -1;
            }
            arr = grown;
        }
        if (as_float) {
            float v = strtof(p, &end);
            memcpy(arr + (size_t)n * elem, &v, elem);
        } else {
            long v = strtol(p, &end, 10);
            int iv = (int)v;
            bad = v < -2147483647L || v > 2147483647L;
            memcpy(arr + (size_t)n * elem, &iv, elem);
        }
        if (end == p || errno || bad) {
            fprintf(stderr, "%s: field '%s': bad number at '%.20s'\n", path, field, p);
            free(arr);
            return -1;
        }
        n++;
        p = end;
    }
    *out = arr;
    *n_out = n;
    return 0;
}

static char *unescape(const char *path, const char *s) {
    size_t len = strlen(s);
    char *out = malloc(len + 1);
    if (!out)
        return NULL;
    size_t k = 0;
    for (size_t i = 0; i < len; i++) {
        if (s[i] == '\n' || s[i] == '\r')
            break;
        if (s[i] != '\\') {
            out[k++] = s[i];
            continue;
        }
        char c = s[++i];
        if (c == 'n') {
            out[k++] = '\n';
        } else if (c == '\\') {
            out[k++] = '\\';
        } else {
            fprintf(stderr, "%s: unknown escape '\\%c' in text\n", path, c ? c : '0');
            free(out);
            return NULL;
        }
    }
    out[k] = '\0';
    return out;
}

/* The value of "name: value" when line starts with "name:", else NULL. */
static const char *field_value(const char *line, const char *name) {
    size_t n = strlen(name);
    if (strncmp(line, name, n) != 0 || line[n] != ':')
        return NULL;
    return line[n + 1] == ' ' ? line + n + 2 : line + n + 1;
}

int golden_run_load(const char *path, struct golden_run *g) {
    memset(g, 0, sizeof *g);
    g->steps = -1;
    FILE *f = fopen(path, "r");
    if (!f) {
        fprintf(stderr, "%s: cannot open: %s\n", path, strerror(errno));
        return -1;
    }
    char *line = NULL;
    size_t cap = 0;
    int rc = -1;
    while (getline(&line, &cap, f) >= 0) {
        const char *v;
        if ((v = field_value(line, "prompt"))) {
            free(g->prompt);
            size_t n = strcspn(v, "\r\n");
            if (!(g->prompt = malloc(n + 1)))
                goto out;
            memcpy(g->prompt, v, n);
            g->prompt[n] = '\0';
        } else if ((v = field_value(line, "steps"))) {
            g->steps = atoi(v);
        } else if ((v = field_value(line, "ids"))) {
            void *arr;
            if (parse_numbers(path, "ids", v, 0, &arr, &g->n_ids) != 0)
                goto out;
            free(g->ids);
            g->ids = arr;
        } else if ((v = field_value(line, "gaps"))) {
            void *arr;
            if (parse_numbers(path, "gaps", v, 1, &arr, &g->n_gaps) != 0)
                goto out;
            free(g->gaps);
            g->gaps = arr;
        } else if ((v = field_value(line, "text"))) {
            free(g->text);
            if (!(g->text = unescape(path, v)))
                goto out;
        }
    }
    if (!g->prompt || g->steps < 1 || !g->ids || g->n_ids < 1 || !g->gaps || !g->text) {
        fprintf(stderr, "%s: missing or empty field (prompt, steps, ids, gaps, text)\n", path);
        goto out;
    }
    if (g->n_gaps != g->n_ids - 1) {
        fprintf(stderr, "%s: %d gaps for %d ids (expected one per forwarded position)\n", path,
                g->n_gaps, g->n_ids);
        goto out;
    }
    rc = 0;
out:
    free(line);
    fclose(f);
    if (rc != 0)
        golden_run_free(g);
    return rc;
}

void golden_run_free(struct golden_run *g) {
    free(g->prompt);
    free(g->ids);
    free(g->gaps);
    free(g->text);
    memset(g, 0, sizeof *g);
}

int golden_logits_load(const char *path, int vocab, struct golden_logits *g) {
    memset(g, 0, sizeof *g);
    g->vocab = vocab;
    FILE *f = fopen(path, "r");
    if (!f) {
        fprintf(stderr, "%s: cannot open: %s\n", path, strerror(errno));
        return -1;
    }
    char *line = NULL;
    size_t cap = 0;
    int rc = -1, cap_pos = 0;
    while (getline(&line, &cap, f) >= 0) {
        int pos, tok;
        if (line[0] == '\n' || line[0] == '\0')
            continue;
        if (sscanf(line, "pos %d token %d", &pos, &tok) != 2 || pos != g->n_pos) {
            fprintf(stderr, "%s: expected 'pos %d token T', got '%.40s'\n", path, g->n_pos, line);
            goto out;
        }
        if (getline(&line, &cap, f) < 0) {
            fprintf(stderr, "%s: no logits after pos %d\n", path, pos);
            goto out;
        }
        void *arr;
        int n;
        if (parse_numbers(path, "logits", line, 1, &arr, &n) != 0)
            goto out;
        if (n != vocab) {
            fprintf(stderr, "%s: pos %d has %d logits, expected %d\n", path, pos, n, vocab);
            free(arr);
            goto out;
        }
        if (g->n_pos == cap_pos) {
            cap_pos = cap_pos ? 2 * cap_pos : 8;
            int *t = realloc(g->token, (size_t)cap_pos * sizeof *t);
            if (t)
                g->token = t;
            float *l = realloc(g->logits, (size_t)cap_pos * (size_t)vocab * sizeof *l);
            if (l)
                g->logits = l;
            if (!t || !l) {
                free(arr);
                goto out;
            }
        }
        g->token[g->n_pos] = tok;
        memcpy(g->logits + (size_t)g->n_pos * (size_t)vocab, arr, (size_t)vocab * sizeof(float));
        free(arr);
        g->n_pos++;
    }
    if (g->n_pos == 0) {
        fprintf(stderr, "%s: no positions\n", path);
        goto out;
    }
    rc = 0;
out:
    free(line);
    fclose(f);
    if (rc != 0)
        golden_logits_free(g);
    return rc;
}

void golden_logits_free(struct golden_logits *g) {
    free(g->token);
    free(g->logits);
    memset(g, 0, sizeof *g);
}

int golden_run_paths(char **paths, int max) {
    char pattern[1100];
    snprintf(pattern, sizeof pattern, "%s/golden/greedy_*.txt", KVR_SHARED_DIR);
    glob_t gl;
    if (glob(pattern, 0, NULL, &gl) != 0)
        return 0;
    int n = 0;
    for (size_t i = 0; i < gl.gl_pathc && n < max; i++) {
        paths[n] = strdup(gl.gl_pathv[i]);
        if (paths[n])
            n++;
    }
    globfree(&gl);
    return n;
}
