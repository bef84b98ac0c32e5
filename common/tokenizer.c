/* tokenizer.c - BPE encoder/decoder over a SentencePiece-style vocabulary, loaded from a
 * llama2.c tokenizer.bin or built from a GGUF file's tokenizer.ggml.* (kvr_tokenizer_create,
 * called through gguf.c). The merge loop uses a heap over adjacent pairs, O(n log n), so
 * that whole documents (perplexity runs over 80 KB of text) encode quickly; it picks
 * exactly the pair llama2.c's quadratic loop picks: the highest score, leftmost among ties. */
#include "tokenizer.h"

#include <ctype.h>
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "gguf.h"
#include "log.h"
#include "status.h"

struct vocab_entry {
    const char *str;
    int id;
};

struct kvr_tokenizer {
    int vocab_size;
    int max_token_len;
    char **vocab;              /* (vocab_size) NUL-terminated strings */
    float *scores;             /* (vocab_size) merge scores */
    struct vocab_entry *sorted; /* (n_sorted) the pieces text may match, sorted by str */
    int n_sorted;
    unsigned char *control;    /* (vocab_size) 1: decodes to ""; NULL: no such piece */
    int bos_id, eos_id;        /* -1: none */
    int add_bos, add_space_prefix;
    int byte_id[256];          /* byte fallback: the token of each byte value */
    unsigned char byte_pieces[512]; /* 256 one-byte strings: byte, NUL */
};

static int cmp_entry(const void *a, const void *b) {
    return strcmp(((const struct vocab_entry *)a)->str, ((const struct vocab_entry *)b)->str);
}

static int lookup(const struct kvr_tokenizer *t, const char *s) {
    struct vocab_entry key = {.str = s};
    const struct vocab_entry *e = bsearch(&key, t->sorted, (size_t)t->n_sorted, sizeof key, cmp_entry);
    return e ? e->id : -1;
}

static int hexval(char c) {
    if (c >= '0' && c <= '9')
        return c - '0';
    if (c >= 'a' && c <= 'f')
        return c - 'a' + 10;
    if (c >= 'A' && c <= 'F')
        return c - 'A' + 10;
    return -1;
}

/* Sorts the lookup table and fills the one-byte pieces: the last step of both loaders. */
static void finish(struct kvr_tokenizer *t) {
    qsort(t->sorted, (size_t)t->n_sorted, sizeof *t->sorted, cmp_entry);
    for (int i = 0; i < 256; i++) {
        t->byte_pieces[2 * i] = (unsigned char)i;
        t->byte_pieces[2 * i + 1] = 0;
    }
}

void kvr_tokenizer_free(struct kvr_tokenizer *t) {
    if (!t)
        return;
    if (t->vocab)
        for (int i = 0; i < t->vocab_size; i++)
            free(t->vocab[i]);
    free(t->vocab);
    free(t->scores);
    free(t->sorted);
    free(t->control);
    free(t);
}

int kvr_tokenizer_create(const struct kvr_tokenizer_spec *sp, struct kvr_tokenizer **out) {
    int rc = KVR_ENOMEM;
    struct kvr_tokenizer *t = NULL;
    const char *name = sp->name ? sp->name : "(vocabulary)";
    int n = sp->n_tokens;
    *out = NULL;
    if (n < 1) {
        KVR_LOG_ERROR("vocabulary of '%s' has %d tokens", name, n);
        return KVR_EINVAL;
    }
    if (sp->bos_id < -1 || sp->bos_id >= n || sp->eos_id < -1 || sp->eos_id >= n ||
        sp->unk_id < -1 || sp->unk_id >= n) {
        KVR_LOG_ERROR("vocabulary of '%s': BOS %d, EOS %d or UNK %d is outside [0, %d)", name,
                      sp->bos_id, sp->eos_id, sp->unk_id, n);
        return KVR_EFORMAT;
    }
    if (!(t = calloc(1, sizeof *t)) || !(t->vocab = calloc((size_t)n, sizeof *t->vocab)) ||
        !(t->scores = calloc((size_t)n, sizeof *t->scores)) ||
        !(t->sorted = calloc((size_t)n, sizeof *t->sorted)) ||
        !(t->control = calloc((size_t)n, 1)))
        goto out;
    t->vocab_size = n;
    t->bos_id = sp->bos_id;
    t->eos_id = sp->eos_id;
    t->add_bos = sp->add_bos;
    t->add_space_prefix = sp->add_space_prefix;
    for (int b = 0; b < 256; b++)
        t->byte_id[b] = -1;
    for (int i = 0; i < n; i++) {
        uint64_t len = sp->piece_nbytes[i];
        int type = sp->types ? (int)sp->types[i] : KVR_TOKEN_NORMAL;
        if (len > KVR_TOKEN_PIECE_MAX) {
            KVR_LOG_ERROR("vocabulary of '%s': token %d is %llu bytes, longer than %d", name, i,
                          (unsigned long long)len, KVR_TOKEN_PIECE_MAX);
            rc = KVR_EFORMAT;
            goto out;
        }
        if (len && memchr(sp->pieces[i], '\0', (size_t)len)) {
            KVR_LOG_ERROR("vocabulary of '%s': token %d holds a NUL byte", name, i);
            rc = KVR_EFORMAT;
            goto out;
        }
        if (type < KVR_TOKEN_NORMAL || type > KVR_TOKEN_BYTE) {
            KVR_LOG_ERROR("vocabulary of '%s': token %d has type %d, not a SentencePiece type (1..6)",
                          name, i, type);
            rc = KVR_EFORMAT;
            goto out;
        }
        float score = sp->scores ? sp->scores[i] : 0.0f;
        if (score != score) {
            KVR_LOG_ERROR("vocabulary of '%s': token %d has a NaN score", name, i);
            rc = KVR_EFORMAT;
            goto out;
        }
        t->scores[i] = score;
        /* U+2581 (3 bytes) becomes ' ' (1 byte): the copy is never longer. */
        char *v = malloc((size_t)len + 1);
        if (!(t->vocab[i] = v))
            goto out;
        size_t k = 0;
        const char *src = sp->pieces[i];
        for (uint64_t j = 0; j < len; j++) {
            if (sp->spm_spaces && j + 2 < len && (unsigned char)src[j] == 0xE2 &&
                (unsigned char)src[j + 1] == 0x96 && (unsigned char)src[j + 2] == 0x81) {
                v[k++] = ' ';
                j += 2;
            } else {
                v[k++] = src[j];
            }
        }
        v[k] = '\0';
        if ((int)k > t->max_token_len)
            t->max_token_len = (int)k;
        t->control[i] = type == KVR_TOKEN_CONTROL;
        if (type == KVR_TOKEN_NORMAL || type == KVR_TOKEN_USER_DEFINED) {
            t->sorted[t->n_sorted].str = v;
            t->sorted[t->n_sorted++].id = i;
        }
        /* Byte pieces are "<0xNN>" (SentencePiece writes two upper-case hex digits). */
        if (k == 6 && (type == KVR_TOKEN_BYTE || !sp->types) && v[0] == '<' && v[1] == '0' &&
            v[2] == 'x' && isxdigit((unsigned char)v[3]) && isxdigit((unsigned char)v[4]) && v[5] == '>') {
            int b = hexval(v[3]) * 16 + hexval(v[4]);
            if (t->byte_id[b] < 0)
                t->byte_id[b] = i;
        }
    }
    if (t->max_token_len < 1)
        t->max_token_len = 1;
    /* A byte without its own piece falls back to UNK (0 when there is none), as llama2.c
     * falls back to 0 past its vocabulary. */
    for (int b = 0; b < 256; b++)
        if (t->byte_id[b] < 0)
            t->byte_id[b] = sp->unk_id >= 0 ? sp->unk_id : 0;
    finish(t);
    *out = t;
    t = NULL;
    rc = KVR_OK;
out:
    kvr_tokenizer_free(t);
    return rc;
}

/* The vocabulary of a GGUF file, whole file mapped for the parse only. */
static int load_gguf(const char *path, int fd, int vocab_size, struct kvr_tokenizer **out) {
    struct stat st;
    if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode) || st.st_size <= 0) {
        KVR_LOG_ERROR("cannot read tokenizer '%s' (not a regular file)", path);
        return KVR_EIO;
    }
    void *map = mmap(NULL, (size_t)st.st_size, PROT_READ, MAP_PRIVATE, fd, 0);
    if (map == MAP_FAILED) {
        KVR_LOG_ERROR("cannot mmap tokenizer '%s': %s", path, strerror(errno));
        return KVR_EIO;
    }
    struct kvr_gguf *g = NULL;
    int rc = kvr_gguf_parse(map, (size_t)st.st_size, path, &g);
    if (rc == KVR_OK)
        rc = kvr_gguf_tokenizer(g, out);
    if (rc == KVR_OK && kvr_tokenizer_vocab_size(*out) != vocab_size) {
        KVR_LOG_ERROR("tokenizer '%s' has %d tokens but the model has %d: it belongs to another model",
                      path, kvr_tokenizer_vocab_size(*out), vocab_size);
        kvr_tokenizer_free(*out);
        *out = NULL;
        rc = KVR_ESHAPE;
    }
    kvr_gguf_free(g);
    munmap(map, (size_t)st.st_size);
    return rc;
}

int kvr_tokenizer_load(const char *path, int vocab_size, struct kvr_tokenizer **out) {
    int rc = KVR_ENOMEM;
    struct kvr_tokenizer *t = NULL;
    FILE *f = NULL;
    *out = NULL;
    if (!path || !*path) {
        KVR_LOG_ERROR("no tokenizer path given");
        return KVR_EINVAL;
    }
    if (vocab_size <= 0) {
        KVR_LOG_ERROR("tokenizer '%s': vocab_size %d must be positive", path, vocab_size);
        return KVR_EINVAL;
    }
    f = fopen(path, "rb");
    if (!f) {
        KVR_LOG_ERROR("cannot open tokenizer '%s': %s", path, strerror(errno));
        return errno == ENOENT ? KVR_ENOENT : KVR_EIO;
    }
    char magic[4];
    if (fread(magic, 1, 4, f) == 4 && memcmp(magic, KVR_GGUF_MAGIC, 4) == 0) {
        rc = load_gguf(path, fileno(f), vocab_size, out);
        fclose(f);
        return rc;
    }
    rewind(f);
    if (!(t = calloc(1, sizeof *t)) || !(t->vocab = calloc((size_t)vocab_size, sizeof *t->vocab)) ||
        !(t->scores = calloc((size_t)vocab_size, sizeof *t->scores)) ||
        !(t->sorted = calloc((size_t)vocab_size, sizeof *t->sorted)))
        goto out;
    t->vocab_size = vocab_size;
    t->bos_id = KVR_TOKEN_BOS;
    t->eos_id = KVR_TOKEN_EOS;
    t->add_bos = 1;
    t->add_space_prefix = 1;
    /* llama2.c's byte fallback: byte b is token b + 3, or 0 past the vocabulary. */
    for (int b = 0; b < 256; b++)
        t->byte_id[b] = b + 3 < vocab_size ? b + 3 : 0;
    int32_t max_len;
    if (fread(&max_len, sizeof max_len, 1, f) != 1) {
        KVR_LOG_ERROR("tokenizer '%s' is truncated (no header)", path);
        rc = KVR_ETRUNC;
        goto out;
    }
    if (max_len <= 0 || max_len > 4096) {
        KVR_LOG_ERROR("tokenizer '%s' has a bad max token length %d", path, max_len);
        rc = KVR_EFORMAT;
        goto out;
    }
    t->max_token_len = max_len;
    for (int i = 0; i < vocab_size; i++) {
        int32_t len;
        if (fread(&t->scores[i], sizeof(float), 1, f) != 1 || fread(&len, sizeof len, 1, f) != 1) {
            KVR_LOG_ERROR("tokenizer '%s' is truncated at entry %d of %d (a tokenizer for a "
                          "smaller vocabulary?)", path, i, vocab_size);
            rc = KVR_ETRUNC;
            goto out;
        }
        if (len < 0 || len > max_len) {
            KVR_LOG_ERROR("tokenizer '%s' entry %d has length %d outside [0, %d]", path, i, len, max_len);
            rc = KVR_EFORMAT;
            goto out;
        }
        if (!(t->vocab[i] = malloc((size_t)len + 1)))
            goto out;
        if (len && fread(t->vocab[i], 1, (size_t)len, f) != (size_t)len) {
            KVR_LOG_ERROR("tokenizer '%s' is truncated inside entry %d", path, i);
            rc = KVR_ETRUNC;
            goto out;
        }
        t->vocab[i][len] = '\0';
        t->sorted[i].str = t->vocab[i];
        t->sorted[i].id = i;
    }
    t->n_sorted = vocab_size;
    if (fgetc(f) != EOF) {
        KVR_LOG_ERROR("tokenizer '%s' has more than the model's %d entries: it belongs to "
                      "another model", path, vocab_size);
        rc = KVR_EFORMAT;
        goto out;
    }
    finish(t);
    *out = t;
    t = NULL;
    rc = KVR_OK;
out:
    if (f)
        fclose(f);
    kvr_tokenizer_free(t);
    return rc;
}

int kvr_tokenizer_vocab_size(const struct kvr_tokenizer *t) { return t->vocab_size; }

int kvr_tokenizer_bos(const struct kvr_tokenizer *t) { return t->bos_id; }

int kvr_tokenizer_eos(const struct kvr_tokenizer *t) { return t->eos_id; }

const char *kvr_tokenizer_vocab(const struct kvr_tokenizer *t, int token) {
    if (token < 0 || token >= t->vocab_size)
        return NULL;
    return t->vocab[token];
}

const char *kvr_tokenizer_piece(const struct kvr_tokenizer *t, int prev, int token) {
    if (token < 0 || token >= t->vocab_size)
        return "";
    if (t->control && t->control[token])
        return "";
    const char *p = t->vocab[token];
    if (t->bos_id >= 0 && prev == t->bos_id && p[0] == ' ')
        p++;
    /* Raw byte tokens look like "<0x0A>": one or two hex digits after "<0x". */
    if (p[0] == '<' && p[1] == '0' && p[2] == 'x') {
        int h1 = hexval(p[3]);
        if (h1 >= 0) {
            int h2 = hexval(p[4]);
            int b = h2 >= 0 ? h1 * 16 + h2 : h1;
            return (const char *)&t->byte_pieces[2 * b];
        }
    }
    return p;
}

const char *kvr_tokenizer_piece_safe(const struct kvr_tokenizer *t, int prev, int token) {
    const char *p = kvr_tokenizer_piece(t, prev, token);
    if (p[0] != '\0' && p[1] == '\0') {
        unsigned char b = (unsigned char)p[0];
        if (!(isprint(b) || isspace(b)))
            return "";
    }
    return p;
}

/* ---- encoder ------------------------------------------------------------------ */

struct pair {
    float score;
    int left;       /* symbol index of the left half; symbols keep text order */
    int right;
    int merged;     /* token id of the concatenation */
    unsigned lver;  /* versions of both halves when the pair was seen */
    unsigned rver;
};

/* Max-heap on score; among equal scores the leftmost pair first. */
static int pair_before(const struct pair *a, const struct pair *b) {
    if (a->score != b->score)
        return a->score > b->score;
    return a->left < b->left;
}

static void heap_push(struct pair *h, int *n, struct pair p) {
    int i = (*n)++;
    h[i] = p;
    while (i > 0) {
        int parent = (i - 1) / 2;
        if (!pair_before(&h[i], &h[parent]))
            break;
        struct pair tmp = h[i];
        h[i] = h[parent];
        h[parent] = tmp;
        i = parent;
    }
}

static struct pair heap_pop(struct pair *h, int *n) {
    struct pair top = h[0];
    h[0] = h[--(*n)];
    int i = 0;
    for (;;) {
        int l = 2 * i + 1, r = l + 1, best = i;
        if (l < *n && pair_before(&h[l], &h[best]))
            best = l;
        if (r < *n && pair_before(&h[r], &h[best]))
            best = r;
        if (best == i)
            break;
        struct pair tmp = h[i];
        h[i] = h[best];
        h[best] = tmp;
        i = best;
    }
    return top;
}

struct symbols {
    int *tok, *prev, *next;
    unsigned *ver;
};

static void try_pair(const struct kvr_tokenizer *t, const struct symbols *s, int l, int r, char *buf,
                     struct pair *heap, int *n_heap) {
    if (l < 0 || r < 0)
        return;
    const char *a = t->vocab[s->tok[l]], *b = t->vocab[s->tok[r]];
    size_t la = strlen(a), lb = strlen(b);
    if (la + lb > (size_t)t->max_token_len)
        return;
    memcpy(buf, a, la);
    memcpy(buf + la, b, lb + 1);
    int id = lookup(t, buf);
    if (id < 0)
        return;
    struct pair p = {.score = t->scores[id], .left = l, .right = r, .merged = id,
                     .lver = s->ver[l], .rver = s->ver[r]};
    heap_push(heap, n_heap, p);
}

int kvr_tokenizer_encode(const struct kvr_tokenizer *t, const char *text, int bos, int eos,
                         int *tokens, int max_tokens, int *n_tokens) {
    *n_tokens = 0;
    if (!text)
        return KVR_EINVAL;
    size_t tlen = strlen(text);
    if (tlen > (size_t)1 << 28)
        return KVR_ERANGE;
    int cap = (int)tlen + 3;
    int rc = KVR_ENOMEM;
    struct symbols s = {0};
    struct pair *heap = NULL;
    char *buf = malloc((size_t)t->max_token_len * 2 + 2);
    s.tok = malloc((size_t)cap * sizeof *s.tok);
    s.prev = malloc((size_t)cap * sizeof *s.prev);
    s.next = malloc((size_t)cap * sizeof *s.next);
    s.ver = calloc((size_t)cap, sizeof *s.ver);
    heap = malloc((size_t)cap * 3 * sizeof *heap);
    if (!buf || !s.tok || !s.prev || !s.next || !s.ver || !heap)
        goto out;

    int n = 0;
    if (bos && t->add_bos && t->bos_id >= 0)
        s.tok[n++] = t->bos_id;
    if (text[0] != '\0' && t->add_space_prefix) {
        int sp = lookup(t, " ");
        if (sp >= 0)
            s.tok[n++] = sp;
    }
    /* Whole UTF-8 code points when the vocabulary has them, else one token per byte. */
    char cp[8];
    size_t cp_len = 0;
    for (const unsigned char *c = (const unsigned char *)text; *c; c++) {
        if ((*c & 0xC0) != 0x80)
            cp_len = 0;
        cp[cp_len++] = (char)*c;
        cp[cp_len] = '\0';
        if ((c[1] & 0xC0) == 0x80 && cp_len < 4)
            continue;
        int id = lookup(t, cp);
        if (id >= 0) {
            s.tok[n++] = id;
        } else {
            for (size_t i = 0; i < cp_len; i++)
                s.tok[n++] = t->byte_id[(unsigned char)cp[i]];
        }
        cp_len = 0;
    }
    for (int i = 0; i < n; i++) {
        s.prev[i] = i - 1;
        s.next[i] = i + 1 < n ? i + 1 : -1;
    }
    int n_heap = 0;
    for (int i = 0; i + 1 < n; i++)
        try_pair(t, &s, i, i + 1, buf, heap, &n_heap);
    int n_alive = n;
    while (n_heap > 0) {
        struct pair p = heap_pop(heap, &n_heap);
        if (s.ver[p.left] != p.lver || s.ver[p.right] != p.rver || s.next[p.left] != p.right)
            continue; /* stale: one half was merged since */
        int l = p.left, r = p.right;
        s.tok[l] = p.merged;
        s.ver[l]++;
        s.ver[r]++; /* r is gone; any pair that named it is now stale */
        s.next[l] = s.next[r];
        if (s.next[r] >= 0)
            s.prev[s.next[r]] = l;
        s.next[r] = -2;
        n_alive--;
        try_pair(t, &s, s.prev[l], l, buf, heap, &n_heap);
        try_pair(t, &s, l, s.next[l], buf, heap, &n_heap);
    }
    eos = eos && t->eos_id >= 0;
    int need = n_alive + (eos ? 1 : 0);
    if (need > max_tokens) {
        rc = KVR_ERANGE;
        *n_tokens = need;
        goto out;
    }
    int k = 0;
    for (int i = n > 0 ? 0 : -1; i >= 0; i = s.next[i])
        tokens[k++] = s.tok[i];
    if (eos)
        tokens[k++] = t->eos_id;
    *n_tokens = k;
    rc = KVR_OK;
out:
    free(buf);
    free(s.tok);
    free(s.prev);
    free(s.next);
    free(s.ver);
    free(heap);
    return rc;
}
