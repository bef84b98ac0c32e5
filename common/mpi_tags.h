/* mpi_tags.h - every MPI tag and message kind of kvrelay, and the fixed header that
 * starts each message. One tag per ordered channel: MPI keeps messages of one
 * (source, tag, communicator) in order. Everything the coordinator tells a node about a
 * request (SEQ_BEGIN, CANCEL, RESET) travels on CTRL, so a cancel can never overtake its
 * request; a sequence's KV blocks and its SEQ_READY travel on SEQ in order.
 * Checklist: a new kind needs kvr_msg_kind_name() (msg.c), a writer/parser pair (msg.c),
 * their unit tests (tests/unit/test_msg.c) and a fuzzer mode (tests/fuzz/fuzz_msg.c). */
#ifndef KVR_MPI_TAGS_H
#define KVR_MPI_TAGS_H

enum kvr_mpi_tag {
    KVR_TAG_CTRL = 101,   /* coordinator -> node: PREFILL_REQ, SEQ_BEGIN, CANCEL, SHUTDOWN,
                           * PING, RESET */
    KVR_TAG_SEQ = 102,    /* prefill -> decode: KV, SEQ_READY, SEQ_ABORT */
    KVR_TAG_REPORT = 103, /* node -> coordinator: HELLO, STATUS, TOKENS, PREFILL_DONE */
};

/* Values are on the wire: append only. */
enum kvr_msg_kind {
    KVR_MSG_HELLO = 1,        /* node -> coord: shape, limits, host (at start, after RESET) */
    KVR_MSG_STATUS = 2,       /* node -> coord: pool usage and queues (every <= 100 ms) */
    KVR_MSG_TOKENS = 3,       /* decode -> coord: this step's tokens and finishes */
    KVR_MSG_PREFILL_DONE = 4, /* prefill -> coord: a prompt left the prefill node */
    KVR_MSG_LINK_PORT = 5,    /* joining node -> coord: my port, accepting this many links */
    KVR_MSG_LINKED = 6,       /* prefill -> coord: connected (or not) to a joining node */
    KVR_MSG_BYE = 7,          /* leaving node -> coord, prefill -> leaving node (SEQ): the
                               * last message on this channel; disconnect follows */
    KVR_MSG_DRAIN_ME = 8,     /* joined node -> coord: I was told to stop (SIGTERM, scancel):
                               * drain me, then LEAVE */
    KVR_MSG_PREFILL_REQ = 10, /* coord -> prefill: run this prompt, ship it to decode_rank */
    KVR_MSG_CANCEL = 11,      /* coord -> node: drop request req_id */
    KVR_MSG_SHUTDOWN = 12,    /* coord -> node: finish and exit */
    KVR_MSG_PING = 13,        /* coord -> node: the coordinator is alive (every second) */
    KVR_MSG_RESET = 14,       /* coord -> node: drop every request, answer with HELLO(epoch) */
    KVR_MSG_LINK = 15,        /* coord -> prefill: connect to a joining node's port */
    KVR_MSG_UNLINK = 16,      /* coord -> prefill: say BYE to a leaving node and disconnect */
    KVR_MSG_LEAVE = 17,       /* coord -> node: drained; disconnect from everyone and exit 0 */
    KVR_MSG_SEQ_BEGIN = 20,   /* coord -> decode: a sequence's parameters and prompt (a
                               * colocated node prefills it itself) */
    KVR_MSG_KV = 21,          /* prefill -> decode: one kv_wire message (layer x block) */
    KVR_MSG_SEQ_READY = 22,   /* prefill -> decode: all KV sent; first token, sampler state */
    KVR_MSG_SEQ_ABORT = 23,   /* prefill -> decode: the sequence will not come (status) */
    KVR_MSG_JOIN_INFO = 24,   /* coord -> spawned node (first message): its id, its peers */
    KVR_MSG_LINK_HELLO = 25,  /* connecting node -> joining node (first message on the new
                               * intercommunicator): who I am */
};

#define KVR_MSG_MAGIC 0x4d52564bu /* "KVRM" little-endian */
#define KVR_MSG_VERSION 2 /* 2: SEQ_BEGIN from the coordinator, reasons, limits */
#define KVR_MSG_HDR_NBYTES 16     /* u32 magic, u16 version, u16 kind, u64 req_id */

/* Why a generation ended (travels in TOKENS; coordinator/coord.h mirrors it). */
enum kvr_finish {
    KVR_FINISH_NONE = 0,
    KVR_FINISH_LENGTH = 1,
    KVR_FINISH_STOP = 2,
    KVR_FINISH_CONTEXT = 3,
    KVR_FINISH_CANCELLED = 4,
    KVR_FINISH_ERROR = 5,
};

#endif /* KVR_MPI_TAGS_H */
