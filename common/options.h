/* options.h - one table per command drives argv parsing, validation, --help text and the
 * startup log of the effective configuration. Precedence: table default < argv. Options
 * are never read from the environment (docs/API.md, "Environment"). */
#ifndef KVR_OPTIONS_H
#define KVR_OPTIONS_H

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

enum kvr_opt_type {
    KVR_OPT_INT,    /* int; min/max bounds */
    KVR_OPT_U64,    /* uint64_t; min/max bounds */
    KVR_OPT_FLOAT,  /* float; min/max bounds */
    KVR_OPT_STRING, /* const char *, borrowed from argv/environ/the table */
    KVR_OPT_SIZE,   /* uint64_t bytes: "512MiB", "2G", "4096" (K/M/G/KiB/MiB/GiB = 1024^n, KB/MB/GB = 1000^n) */
    KVR_OPT_FLAG,   /* int 0/1; takes no value */
    KVR_OPT_CHOICE, /* int index into choices ("a|b|c") */
};

struct kvr_opt {
    const char *name;       /* long option without dashes: "kv-window" */
    enum kvr_opt_type type;
    size_t offset;          /* offsetof(field) in the caller's config struct */
    const char *def;        /* default as text; NULL: unset (strings NULL, numbers 0) */
    double min, max;        /* inclusive bounds for numeric types; ignored when min > max */
    const char *choices;    /* for KVR_OPT_CHOICE: "dense|window|recompute|sink" */
    int required;           /* 1: must be given */
    const char *help;       /* one line */
};

/* Parses argv[first..argc) into cfg. Returns 0 on success, 1 when --help/-h was given
 * (nothing else is checked), or KVR_EINVAL with a one-line reason in err (unknown
 * option, missing or malformed value, value out of range, missing required option,
 * stray positional argument). cfg must be caller-owned memory laid out as the table says. */
int kvr_opts_parse(const struct kvr_opt *table, int n_opts, void *cfg, int argc, char **argv,
                   int first, char *err, size_t err_len);

/* Prints "usage: prog [options]", summary and one line per option to f. */
void kvr_opts_usage(FILE *f, const char *prog, const char *summary, const struct kvr_opt *table,
                    int n_opts);

/* Logs the effective configuration at INFO level, one line. */
void kvr_opts_log(const char *prog, const struct kvr_opt *table, int n_opts, const void *cfg);

/* Parses a byte size ("512MiB", "1G", "1000000"). Returns 0 or KVR_EINVAL. */
int kvr_parse_size(const char *s, uint64_t *out);

/* Formats a byte count as "512.0MiB" into buf. Returns buf. */
char *kvr_format_size(uint64_t nbytes, char *buf, size_t len);

#endif /* KVR_OPTIONS_H */
