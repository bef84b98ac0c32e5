#!/usr/bin/python3
"""py_client.py - an independent client of kvrelay.v1.Inference for the end-to-end tests:
Python's grpcio (Debian python3-grpcio) over TLS with a bearer token, and Google's
protobuf runtime with classes that protoc generates from proto/kvrelay.proto at run time
(nothing of kvrelay's C client or protobuf-c is involved).

usage: py_client.py --proto-dir DIR --out-dir TMP --addr HOST:PORT --ca PEM
                    [--server-name NAME] [--token-file FILE] [--text-out FILE]
                    health|status|generate [PROMPT MAX_TOKENS]
Prints one JSON object: {"code": "OK"|<status name>, "message": ..., ...result fields}.
Exit status 0 when the call ran (whatever its status), 2 on a usage or setup error."""
import argparse
import importlib
import json
import subprocess
import sys


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--proto-dir", required=True)
    ap.add_argument("--out-dir", required=True)
    ap.add_argument("--addr", required=True)
    ap.add_argument("--ca", required=True)
    ap.add_argument("--server-name")
    ap.add_argument("--token-file")
    ap.add_argument("--text-out", help="generate: write the text (prompt_text + pieces) here")
    ap.add_argument("method", choices=["health", "status", "generate"])
    ap.add_argument("prompt", nargs="?", default="")
    ap.add_argument("max_tokens", nargs="?", type=int, default=0)
    a = ap.parse_args()

    subprocess.run(["protoc", "-I", a.proto_dir, "--python_out", a.out_dir,
                    a.proto_dir + "/kvrelay.proto"], check=True)
    sys.path.insert(0, a.out_dir)
    pb = importlib.import_module("kvrelay_pb2")
    import grpc

    with open(a.ca, "rb") as f:
        creds = grpc.ssl_channel_credentials(root_certificates=f.read())
    options = []
    if a.server_name:
        options.append(("grpc.ssl_target_name_override", a.server_name))
    metadata = []
    if a.token_file:
        with open(a.token_file) as f:
            token = next(line.strip() for line in f if line.strip() and not line.startswith("#"))
        metadata.append(("authorization", "Bearer " + token))

    out = {}
    with grpc.secure_channel(a.addr, creds, options=options) as ch:
        try:
            if a.method == "health":
                call = ch.unary_unary("/kvrelay.v1.Inference/Health",
                                      request_serializer=pb.HealthRequest.SerializeToString,
                                      response_deserializer=pb.HealthResponse.FromString)
                r = call(pb.HealthRequest(), metadata=metadata, timeout=30)
                out.update(serving=r.serving, detail=r.detail)
            elif a.method == "status":
                call = ch.unary_unary("/kvrelay.v1.Inference/ClusterStatus",
                                      request_serializer=pb.ClusterStatusRequest.SerializeToString,
                                      response_deserializer=pb.ClusterStatusResponse.FromString)
                r = call(pb.ClusterStatusRequest(), metadata=metadata, timeout=30)
                out.update(hosts=[n.host for n in r.nodes], seq_len=r.seq_len)
            else:
                call = ch.unary_stream("/kvrelay.v1.Inference/Generate",
                                       request_serializer=pb.GenerateRequest.SerializeToString,
                                       response_deserializer=pb.GenerateResponse.FromString)
                req = pb.GenerateRequest(prompt=a.prompt, max_tokens=a.max_tokens, temperature=0.0)
                text, n = "", 0
                for m in call(req, metadata=metadata, timeout=120):
                    text += m.prompt_text
                    if m.HasField("done"):
                        out["generated_tokens"] = m.done.usage.generated_tokens
                    else:
                        text += m.text
                        n += 1
                out.update(tokens=n)
                if a.text_out:
                    with open(a.text_out, "w", encoding="utf-8", newline="") as f:
                        f.write(text)
            out.update(code="OK", message="")
        except grpc.RpcError as e:
            out.update(code=e.code().name, message=e.details() or "")
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
