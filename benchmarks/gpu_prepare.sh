#!/usr/bin/env bash
# Prepare what benchmarks/gpu_suite.sh needs on a GPU machine without a network, from this machine:
#   .whl/       wheels of the Python packages that machine lacks (for CPython 3.12, manylinux x86-64)
#   .devcache/  a KDKIT_CACHE holding the cached arithmetic teacher and SmolLM2-135M-Instruct's
#               config and tokenizer (no weights: SmolLM2-size GPU runs use random weights)
# Both folders are git-ignored; a device tool carries them (`carry: [".whl", ".devcache"]`).
#
#   bash benchmarks/gpu_prepare.sh        # after `make setup` and one run that built the teacher
set -euo pipefail
cd "$(dirname "$0")/.."
SOURCE=${KDKIT_CACHE:-$HOME/.cache/kdkit}
PLATFORMS="--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64"
mkdir -p .whl
# pydantic (kdkit's configs), TRL and datasets (the comparison), opacus and gguf (tests); versions
# this project runs with, datasets 4.8 for its looser pyarrow requirement (>= 21)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp $PLATFORMS \
  -d .whl pydantic==2.14.4 pydantic_core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 \
  typing_extensions==4.16.0 trl==1.16.0 datasets==4.8.0 dill==0.4.1 multiprocess==0.70.19 \
  opacus==1.6.0 gguf==0.19.0
teacher=$(ls -d "$SOURCE"/teachers/arithmetic-* | head -n 1)
mkdir -p .devcache/teachers .devcache/models/SmolLM2-135M-Instruct
mkdir -p ".devcache/teachers/$(basename "$teacher")" && cp "$teacher"/*.json "$teacher"/model.safetensors ".devcache/teachers/$(basename "$teacher")/"
for f in chat_template.jinja config.json generation_config.json tokenizer.json tokenizer_config.json; do
  cp "$SOURCE/models/SmolLM2-135M-Instruct/$f" .devcache/models/SmolLM2-135M-Instruct/
done
du -sh .whl .devcache
