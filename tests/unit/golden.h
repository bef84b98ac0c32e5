/* golden.h - readers for the llama2.c reference files in ../shared/golden, shared by the
 * engine's tests (teacher forcing, tokenizer, CLI end to end). */
#ifndef KVR_TEST_GOLDEN_H
#define KVR_TEST_GOLDEN_H

/* One greedy_N.txt: a llama2.c `run` at temperature 0. */
struct golden_run {
    char *prompt; /* the prompt text (may be "") */
    int steps;    /* run's -n */
    int *ids; /* (n_ids) the whole sequence, BOS first; ends with BOS (1) when run stopped there */
    int n_ids;
    float *gaps; /* (n_gaps) top-1 minus top-2 logit at each forwarded position */
    int n_gaps;
    char *text; /* what run printed, with "\n" unescaped to a newline */
};

/* Parses path into g (owned; free with golden_run_free). Returns 0, or -1 after printing
 * the reason to stderr (missing file, missing field, bad number, unknown escape). */
int golden_run_load(const char *path, struct golden_run *g);
void golden_run_free(struct golden_run *g);

/* logits_once_upon_a_time.txt: "pos P token T" lines, each followed by a line of vocab
 * logits. */
struct golden_logits {
    int n_pos;
    int vocab;
    int *token;    /* (n_pos) input token at each position */
    float *logits; /* (n_pos, vocab) */
};

/* Parses path; every logits line must have exactly vocab numbers. 0 or -1 (printed). */
int golden_logits_load(const char *path, int vocab, struct golden_logits *g);
void golden_logits_free(struct golden_logits *g);

/* Paths of ../shared/golden/greedy_<i>.txt for i = 1, 2, ... that exist, in order.
 * Fills up to max entries of paths (each owned, free with free()); returns the count. */
int golden_run_paths(char **paths, int max);

#endif /* KVR_TEST_GOLDEN_H */
