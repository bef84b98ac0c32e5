/* options.c - table-driven option parsing (see options.h). Used by every main(). */
#include "options.h"

#include <ctype.h>
#include <errno.h>
#include <math.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>

#include "log.h"
#include "status.h"

static void set_err(char *err, size_t len, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
static void set_err(char *err, size_t len, const char *fmt, ...) {
    if (!err || !len)
        return;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err, len, fmt, ap);
    va_end(ap);
}

int kvr_parse_size(const char *s, uint64_t *out) {
    if (!s || !*s)
        return KVR_EINVAL;
    /* Plain decimal only: strtod alone would also take "0x10", "1e3", " 5" and "inf". */
    size_t n_num = strspn(s, "0123456789.");
    if (n_num == 0)
        return KVR_EINVAL;
    errno = 0;
    char *end = NULL;
    double v = strtod(s, &end);
    if (errno || end != s + n_num || !(v >= 0) || !isfinite(v))
        return KVR_EINVAL;
    while (*end == ' ')
        end++;
    double mult = 1;
    char u = (char)toupper((unsigned char)*end);
    if (u == 'K' || u == 'M' || u == 'G' || u == 'T') {
        int p = u == 'K' ? 1 : u == 'M' ? 2 : u == 'G' ? 3 : 4;
        end++;
        double base = 1024;
        if (*end == 'i' || *end == 'I') {
            end++;
            if (*end == 'B' || *end == 'b')
                end++;
        } else if (*end == 'B' || *end == 'b') {
            base = 1000;
            end++;
        }
        mult = pow(base, p);
    } else if (u == 'B') {
        end++;
    }
    if (*end != '\0')
        return KVR_EINVAL;
    double bytes = v * mult;
    if (bytes > 18e18)
        return KVR_EINVAL;
    *out = (uint64_t)bytes;
    return KVR_OK;
}

char *kvr_format_size(uint64_t nbytes, char *buf, size_t len) {
    static const char *units[] = {"B", "KiB", "MiB", "GiB", "TiB"};
    double v = (double)nbytes;
    int u = 0;
    while (v >= 1024 && u < 4) {
        v /= 1024;
        u++;
    }
    snprintf(buf, len, u ? "%.1f%s" : "%.0f%s", v, units[u]);
    return buf;
}

static int choice_index(const char *choices, const char *val) {
    size_t vlen = strlen(val);
    int idx = 0;
    for (const char *p = choices; *p;) {
        const char *bar = strchr(p, '|');
        size_t n = bar ? (size_t)(bar - p) : strlen(p);
        if (n == vlen && strncmp(p, val, n) == 0)
            return idx;
        idx++;
        if (!bar)
            break;
        p = bar + 1;
    }
    return -1;
}

static int in_range(const struct kvr_opt *o, double v) {
    return o->min > o->max || (v >= o->min && v <= o->max);
}

static int set_value(const struct kvr_opt *o, void *cfg, const char *val, char *err, size_t err_len) {
    char *field = (char *)cfg + o->offset;
    char *end = NULL;
    errno = 0;
    switch (o->type) {
    case KVR_OPT_INT: {
        long v = strtol(val, &end, 10);
        if (errno || end == val || *end || v < -2147483647L || v > 2147483647L) {
            set_err(err, err_len, "--%s: '%s' is not an integer", o->name, val);
            return KVR_EINVAL;
        }
        if (!in_range(o, (double)v)) {
            set_err(err, err_len, "--%s: %ld is outside [%.0f, %.0f]", o->name, v, o->min, o->max);
            return KVR_EINVAL;
        }
        *(int *)field = (int)v;
        return KVR_OK;
    }
    case KVR_OPT_U64: {
        if (val[0] == '-') {
            set_err(err, err_len, "--%s: '%s' is not a non-negative integer", o->name, val);
            return KVR_EINVAL;
        }
        unsigned long long v = strtoull(val, &end, 10);
        if (errno || end == val || *end) {
            set_err(err, err_len, "--%s: '%s' is not a non-negative integer", o->name, val);
            return KVR_EINVAL;
        }
        if (!in_range(o, (double)v)) {
            set_err(err, err_len, "--%s: %llu is outside [%.0f, %.0f]", o->name, v, o->min, o->max);
            return KVR_EINVAL;
        }
        *(uint64_t *)field = (uint64_t)v;
        return KVR_OK;
    }
    case KVR_OPT_FLOAT: {
        double v = strtod(val, &end);
        if (errno || end == val || *end || !isfinite(v)) {
            set_err(err, err_len, "--%s: '%s' is not a number", o->name, val);
            return KVR_EINVAL;
        }
        if (!in_range(o, v)) {
            set_err(err, err_len, "--%s: %g is outside [%g, %g]", o->name, v, o->min, o->max);
            return KVR_EINVAL;
        }
        *(float *)field = (float)v;
        return KVR_OK;
    }
    case KVR_OPT_STRING:
        *(const char **)field = val;
        return KVR_OK;
    case KVR_OPT_SIZE: {
        uint64_t v;
        if (kvr_parse_size(val, &v) != KVR_OK) {
            set_err(err, err_len, "--%s: '%s' is not a size (e.g. 512MiB, 2G, 65536)", o->name, val);
            return KVR_EINVAL;
        }
        if (!in_range(o, (double)v)) {
            set_err(err, err_len, "--%s: %s is outside [%.0f, %.0f] bytes", o->name, val, o->min, o->max);
            return KVR_EINVAL;
        }
        *(uint64_t *)field = v;
        return KVR_OK;
    }
    case KVR_OPT_FLAG:
        if (!strcmp(val, "1") || !strcmp(val, "true") || !strcmp(val, "yes")) {
            *(int *)field = 1;
        } else if (!strcmp(val, "0") || !strcmp(val, "false") || !strcmp(val, "no")) {
            *(int *)field = 0;
        } else {
            set_err(err, err_len, "--%s: '%s' is not a boolean", o->name, val);
            return KVR_EINVAL;
        }
        return KVR_OK;
    case KVR_OPT_CHOICE: {
        int idx = choice_index(o->choices, val);
        if (idx < 0) {
            set_err(err, err_len, "--%s: '%s' is not one of %s", o->name, val, o->choices);
            return KVR_EINVAL;
        }
        *(int *)field = idx;
        return KVR_OK;
    }
    }
    return KVR_EINVAL;
}

static const struct kvr_opt *find_opt(const struct kvr_opt *t, int n, const char *name, size_t len) {
    for (int i = 0; i < n; i++)
        if (strlen(t[i].name) == len && strncmp(t[i].name, name, len) == 0)
            return &t[i];
    return NULL;
}

int kvr_opts_parse(const struct kvr_opt *table, int n_opts, void *cfg, int argc, char **argv,
                   int first, char *err, size_t err_len) {
    unsigned char seen[256] = {0};
    if (n_opts > 256) {
        set_err(err, err_len, "too many options in table");
        return KVR_EINVAL;
    }
    for (int i = first; i < argc; i++)
        if (!strcmp(argv[i], "--help") || !strcmp(argv[i], "-h"))
            return 1;
    /* Defaults first, then argv. Options are never read from the environment: a variable
     * meant for one program (or a launcher script) must not change another's behaviour.
     * The only variable kvrelay reads is KVR_LOG_LEVEL (log.h). */
    for (int i = 0; i < n_opts; i++) {
        const struct kvr_opt *o = &table[i];
        if (o->def) {
            if (set_value(o, cfg, o->def, err, err_len) != KVR_OK)
                return KVR_EINVAL;
        } else if (o->type == KVR_OPT_STRING) {
            *(const char **)((char *)cfg + o->offset) = NULL;
        }
    }
    for (int i = first; i < argc; i++) {
        const char *a = argv[i];
        if (strncmp(a, "--", 2) != 0 || a[2] == '\0') {
            set_err(err, err_len, "unexpected argument '%s' (options are --name value)", a);
            return KVR_EINVAL;
        }
        const char *name = a + 2;
        const char *eq = strchr(name, '=');
        size_t nlen = eq ? (size_t)(eq - name) : strlen(name);
        const struct kvr_opt *o = find_opt(table, n_opts, name, nlen);
        if (!o) {
            set_err(err, err_len, "unknown option '--%.*s' (see --help)", (int)nlen, name);
            return KVR_EINVAL;
        }
        const char *val;
        if (eq) {
            val = eq + 1;
        } else if (o->type == KVR_OPT_FLAG) {
            val = "1";
        } else {
            if (i + 1 >= argc) {
                set_err(err, err_len, "option '--%s' needs a value", o->name);
                return KVR_EINVAL;
            }
            val = argv[++i];
        }
        if (set_value(o, cfg, val, err, err_len) != KVR_OK)
            return KVR_EINVAL;
        seen[o - table] = 1;
    }
    for (int i = 0; i < n_opts; i++) {
        if (table[i].required && !seen[i] && !table[i].def) {
            set_err(err, err_len, "option '--%s' is required", table[i].name);
            return KVR_EINVAL;
        }
    }
    return KVR_OK;
}

static const char *type_hint(const struct kvr_opt *o) {
    switch (o->type) {
    case KVR_OPT_INT:
    case KVR_OPT_U64:
        return "N";
    case KVR_OPT_FLOAT:
        return "X";
    case KVR_OPT_STRING:
        return "S";
    case KVR_OPT_SIZE:
        return "SIZE";
    case KVR_OPT_FLAG:
        return "";
    case KVR_OPT_CHOICE:
        return o->choices;
    }
    return "";
}

void kvr_opts_usage(FILE *f, const char *prog, const char *summary, const struct kvr_opt *table,
                    int n_opts) {
    fprintf(f, "usage: %s [options]\n%s\n\noptions:\n", prog, summary);
    for (int i = 0; i < n_opts; i++) {
        const struct kvr_opt *o = &table[i];
        char left[96];
        snprintf(left, sizeof left, "--%s %s", o->name, type_hint(o));
        fprintf(f, "  %-34s %s", left, o->help);
        if (o->required)
            fprintf(f, " (required)");
        else if (o->def)
            fprintf(f, " (default %s)", o->def);
        fprintf(f, "\n");
    }
    fprintf(f, "  %-34s %s\n", "--help", "print this help and exit");
    fprintf(f, "Environment: only KVR_LOG_LEVEL (error|warn|info|debug) is read.\n");
}

void kvr_opts_log(const char *prog, const struct kvr_opt *table, int n_opts, const void *cfg) {
    if (KVR_LOG_LEVEL_INFO > kvr_log_level)
        return;
    char line[900];
    size_t k = 0;
    for (int i = 0; i < n_opts && k + 64 < sizeof line; i++) {
        const struct kvr_opt *o = &table[i];
        const char *field = (const char *)cfg + o->offset;
        int w = 0;
        switch (o->type) {
        case KVR_OPT_INT:
        case KVR_OPT_FLAG:
            w = snprintf(line + k, sizeof line - k, " %s=%d", o->name, *(const int *)field);
            break;
        case KVR_OPT_U64:
        case KVR_OPT_SIZE:
            w = snprintf(line + k, sizeof line - k, " %s=%llu", o->name,
                         (unsigned long long)*(const uint64_t *)field);
            break;
        case KVR_OPT_FLOAT:
            w = snprintf(line + k, sizeof line - k, " %s=%g", o->name, (double)*(const float *)field);
            break;
        case KVR_OPT_STRING: {
            const char *s = *(const char *const *)field;
            w = snprintf(line + k, sizeof line - k, " %s=%s", o->name, s ? s : "(unset)");
            break;
        }
        case KVR_OPT_CHOICE: {
            /* The idx-th '|'-separated name of the choices. */
            const char *c = o->choices;
            for (int idx = *(const int *)field; idx > 0 && c; idx--)
                if ((c = strchr(c, '|')))
                    c++;
            int len = c ? (int)strcspn(c, "|") : 1;
            w = snprintf(line + k, sizeof line - k, " %s=%.*s", o->name, len, c ? c : "?");
            break;
        }
        }
        if (w > 0)
            k += (size_t)w < sizeof line - k ? (size_t)w : sizeof line - k - 1;
    }
    line[k] = '\0';
    KVR_LOG_INFO("%s config:%s", prog, line);
}
