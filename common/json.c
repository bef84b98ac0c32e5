/* json.c - writes strings as JSON literals for every --json output (the CLI, the client's
 * tools, the benchmarks). Owns nothing. */
#include "json.h"

/* Length of the valid UTF-8 sequence at p (1-4), or 0 when it is not one. */
static int utf8_len(const unsigned char *p) {
    unsigned char b = p[0];
    int n = b < 0x80 ? 1 : (b >> 5) == 0x6 ? 2 : (b >> 4) == 0xE ? 3 : (b >> 3) == 0x1E ? 4 : 0;
    if (n == 0 || (n == 2 && b < 0xC2))
        return 0;
    for (int i = 1; i < n; i++)
        if ((p[i] & 0xC0) != 0x80)
            return 0;
    if (n == 3) {
        unsigned cp = ((b & 0x0Fu) << 12) | ((p[1] & 0x3Fu) << 6) | (p[2] & 0x3Fu);
        if (cp < 0x800 || (cp >= 0xD800 && cp <= 0xDFFF))
            return 0;
    } else if (n == 4) {
        unsigned cp =
            ((b & 0x07u) << 18) | ((p[1] & 0x3Fu) << 12) | ((p[2] & 0x3Fu) << 6) | (p[3] & 0x3Fu);
        if (cp < 0x10000 || cp > 0x10FFFF)
            return 0;
    }
    return n;
}

void kvr_json_write_string(FILE *f, const char *s) {
    const unsigned char *p = (const unsigned char *)(s ? s : "");
    fputc('"', f);
    while (*p) {
        unsigned char ch = *p;
        switch (ch) {
        case '"':
            fputs("\\\"", f);
            p++;
            continue;
        case '\\':
            fputs("\\\\", f);
            p++;
            continue;
        case '\n':
            fputs("\\n", f);
            p++;
            continue;
        case '\r':
            fputs("\\r", f);
            p++;
            continue;
        case '\t':
            fputs("\\t", f);
            p++;
            continue;
        default:
            break;
        }
        if (ch < 0x20 || ch == 0x7F) {
            fprintf(f, "\\u%04x", ch);
            p++;
            continue;
        }
        int n = utf8_len(p);
        if (n == 0) {
            fputs("\\ufffd", f);
            p++;
            continue;
        }
        fwrite(p, 1, (size_t)n, f);
        p += n;
    }
    fputc('"', f);
}
