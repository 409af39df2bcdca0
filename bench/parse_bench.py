"""Time parsing a 2,000-line Containerfile: it happens on every build, so it must stay in the milliseconds.

Run: python bench/parse_bench.py [LINES]   (prints the numbers; asserts nothing)
"""

from __future__ import annotations

import sys
import time

from rootless.frontend.containerfile import dump, parse
from rootless.frontend.instructions import parse_instruction
from rootless.frontend.shell import Lexer

# A realistic mix: continuations, comments, JSON and shell forms, flags, ENV/LABEL pairs, heredocs.
BLOCK = """\
# stage {i}
FROM --platform=$BUILDPLATFORM golang:1.22-alpine AS build{i}
ARG VERSION=1.{i}.0 TARGETOS TARGETARCH
ENV CGO_ENABLED=0 GOOS=${{TARGETOS}} GOARCH=$TARGETARCH \\
    PATH=/go/bin:$PATH
WORKDIR /src/app{i}
COPY --chown=1000:1000 --chmod=0644 go.mod go.sum ./
RUN --mount=type=cache,target=/go/pkg/mod \\
    --mount=type=cache,target=/root/.cache/go-build \\
    go mod download && \\
    # a comment inside a continuation
    go build -ldflags "-X main.version=${{VERSION}}" -o /out/app{i} ./cmd/app
COPY <<EOF /etc/app{i}.conf
listen = :80{i}
EOF
LABEL org.opencontainers.image.title="app {i}" org.opencontainers.image.version=$VERSION
EXPOSE 80{i}/tcp 443
USER 1000:1000
HEALTHCHECK --interval=30s --timeout=3s CMD wget -q -O- http://localhost/ || exit 1
ENTRYPOINT ["/out/app{i}", "--config", "/etc/app{i}.conf"]
CMD ["serve"]
"""


def containerfile(lines: int) -> str:
    out: list[str] = []
    i = 0
    while sum(s.count("\n") for s in out) < lines:
        out.append(BLOCK.format(i=i))
        i += 1
    return "".join(out)


def best_of(fn: object, repeat: int = 20) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()  # type: ignore[operator]
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> None:
    lines = int(sys.argv[1]) if len(sys.argv) > 1 else 2000
    text = containerfile(lines).encode()
    cf = parse(text)
    nodes = len(cf.nodes)
    lexer = Lexer(cf.escape)
    env = {
        "BUILDPLATFORM": "linux/amd64",
        "TARGETOS": "linux",
        "TARGETARCH": "amd64",
        "PATH": "/usr/bin",
        "VERSION": "1",
    }

    def instructions() -> None:
        for n in cf.nodes:
            parse_instruction(n, "Containerfile").expand(lexer, env)

    t_parse = best_of(lambda: parse(text))
    t_dump = best_of(lambda: dump(cf))
    t_instr = best_of(instructions)
    print(f"{len(text.splitlines())} lines, {len(text)} bytes, {nodes} instructions")
    print(f"parse:                      {t_parse * 1000:8.2f} ms")
    print(f"dump:                       {t_dump * 1000:8.2f} ms")
    print(f"parse_instruction + expand: {t_instr * 1000:8.2f} ms")
    print(f"total:                      {(t_parse + t_instr) * 1000:8.2f} ms")


if __name__ == "__main__":
    main()
