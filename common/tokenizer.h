/* tokenizer.h - SentencePiece-style BPE with scores, byte fallback (<0xXX> pieces) and
 * llama2.c's leading-space rules: one implementation, two loaders. kvr_tokenizer_load reads
 * a llama2.c tokenizer.bin (BOS=1, EOS=2, bytes at ids 3..258) or the vocabulary of a GGUF
 * file; kvr_tokenizer_create builds one from any vocabulary (model.c passes a GGUF model's
 * tokenizer.ggml.* metadata). Immutable after load: safe to share across threads. */
#ifndef KVR_TOKENIZER_H
#define KVR_TOKENIZER_H

#include <stddef.h>

#include <stdint.h>

/* llama2.c's BOS and EOS ids (a GGUF vocabulary names its own: kvr_tokenizer_bos). */
#define KVR_TOKEN_BOS 1
#define KVR_TOKEN_EOS 2

/* Longest piece accepted from a vocabulary, in bytes. */
#define KVR_TOKEN_PIECE_MAX 65536

struct kvr_tokenizer;

/* SentencePiece token types (GGUF tokenizer.ggml.token_type). */
enum kvr_token_type {
    KVR_TOKEN_NORMAL = 1,
    KVR_TOKEN_UNKNOWN = 2,
    KVR_TOKEN_CONTROL = 3,
    KVR_TOKEN_USER_DEFINED = 4,
    KVR_TOKEN_UNUSED = 5,
    KVR_TOKEN_BYTE = 6,
};

/* A vocabulary to build a tokenizer from; every array has n_tokens entries and is
 * borrowed for the call only. */
struct kvr_tokenizer_spec {
    const char *name;                 /* for error lines (the file) */
    int n_tokens;
    const char *const *pieces;        /* bytes of each piece, not NUL-terminated */
    const uint64_t *piece_nbytes;
    const float *scores;              /* merge scores; NULL: all 0 */
    const int32_t *types;             /* enum kvr_token_type; NULL: all normal */
    int bos_id, eos_id, unk_id;       /* -1: the vocabulary has none */
    int add_bos;                      /* encode puts BOS first when asked to */
    int add_space_prefix;             /* encode puts a " " piece first (SentencePiece's
                                       * dummy prefix, llama2.c's rule) */
    int spm_spaces;                   /* pieces write ' ' as U+2581 (SentencePiece) */
};

/* Builds a tokenizer from spec. Pieces are stored with U+2581 turned into ' ' (when
 * spm_spaces); byte fallback uses the BYTE pieces "<0xNN>"; only normal and user-defined
 * pieces are matched against text (control, unknown, unused and byte pieces never are);
 * control pieces decode to "". Errors (logged with spec->name): KVR_EFORMAT a piece
 * longer than KVR_TOKEN_PIECE_MAX or holding a NUL byte, an id out of range, a NaN
 * score, an unknown token type; KVR_EINVAL n_tokens < 1; KVR_ENOMEM. Returns owned *out. */
int kvr_tokenizer_create(const struct kvr_tokenizer_spec *spec, struct kvr_tokenizer **out);

/* Loads the tokenizer at path for a model with vocab_size tokens: a llama2.c
 * tokenizer.bin, or a GGUF file (by its magic) whose tokenizer.ggml.* vocabulary is used.
 * Errors (logged): KVR_ENOENT missing, KVR_ETRUNC fewer entries than vocab_size,
 * KVR_EFORMAT negative/oversize lengths or more bytes than vocab_size entries (a tokenizer
 * of another model), KVR_ESHAPE a GGUF vocabulary of another size; GGUF errors as
 * kvr_model_tokenizer. Returns owned *out, free with kvr_tokenizer_free. */
int kvr_tokenizer_load(const char *path, int vocab_size, struct kvr_tokenizer **out);

/* Accepts NULL. */
void kvr_tokenizer_free(struct kvr_tokenizer *t);

int kvr_tokenizer_vocab_size(const struct kvr_tokenizer *t);

/* BOS and EOS ids (-1: none). */
int kvr_tokenizer_bos(const struct kvr_tokenizer *t);
int kvr_tokenizer_eos(const struct kvr_tokenizer *t);

/* Encodes text as llama2.c's encode(): BOS when bos and the vocabulary adds one, a
 * dummy-prefix " " when text is not empty (and the vocabulary wants it), UTF-8 code
 * points looked up whole or byte-fallback, then greedy BPE merges by score (leftmost
 * among equal scores), EOS when eos and the vocabulary has one. At most strlen(text)+3
 * tokens.
 * Writes up to max_tokens ids into tokens and the count into *n_tokens.
 * KVR_ERANGE when max_tokens is too small (nothing useful written), KVR_ENOMEM. */
int kvr_tokenizer_encode(const struct kvr_tokenizer *t, const char *text, int bos, int eos,
                         int *tokens, int max_tokens, int *n_tokens);

/* The text of token after prev, as llama2.c's decode(): the leading space is dropped
 * after BOS, <0xXX> pieces become the raw byte, control pieces of a GGUF vocabulary are
 * "". Borrowed from t; "" for an id out of range. */
const char *kvr_tokenizer_piece(const struct kvr_tokenizer *t, int prev, int token);

/* Like kvr_tokenizer_piece but filtered as llama2.c's safe_printf: a single byte that is
 * neither printable nor whitespace becomes "". This is what generate prints. */
const char *kvr_tokenizer_piece_safe(const struct kvr_tokenizer *t, int prev, int token);

/* The raw vocabulary string of a token (no decoding rules); NULL when out of range. */
const char *kvr_tokenizer_vocab(const struct kvr_tokenizer *t, int token);

#endif /* KVR_TOKENIZER_H */
