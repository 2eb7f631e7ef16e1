"""Peers that the GPU machine lacks, loaded from wheels carried in .gpu/wheels (issue 8).

Download them on a machine with network access:
    pip download --no-deps nvidia-modelopt==0.47.0 sageattention==1.0.6 -d .gpu/wheels
They are installed with `pip install --no-deps --target` into a temporary directory.
"""
import glob, importlib, os, subprocess, sys, tempfile, types


def _install(wheels, pattern, name):
    target = os.path.join(tempfile.gettempdir(), name + "-wheel")
    if not os.path.isdir(os.path.join(target, name)):
        found = glob.glob(os.path.join(wheels, pattern))
        if not found:
            raise FileNotFoundError(f"no {pattern} in {wheels}")
        subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--quiet", "--target", target] + found, check=True)
    return target


def modelopt_attention(wheels=".gpu/wheels"):
    """ModelOpt's Triton flash-attention module (`triton_fa`, function `attention`). Its package
    __init__ files import much that the GPU machine lacks (pydantic, ...): the parents of the
    kernel module are registered as bare packages, so only the kernel and its helpers load."""
    target = _install(wheels, "nvidia_modelopt-*.whl", "modelopt")
    for pkg in ["modelopt", "modelopt.torch", "modelopt.torch.kernels", "modelopt.torch.kernels.common",
                "modelopt.torch.kernels.common.attention", "modelopt.torch.kernels.sparsity",
                "modelopt.torch.kernels.sparsity.attention", "modelopt.torch.kernels.quantization",
                "modelopt.torch.kernels.quantization.attention", "modelopt.torch.kernels.quantization.common"]:
        m = types.ModuleType(pkg)
        m.__path__ = [os.path.join(target, *pkg.split("."))]
        sys.modules[pkg] = m
    return importlib.import_module("modelopt.torch.kernels.common.attention.triton_fa")


def sageattn1(wheels=".gpu/wheels"):
    """SageAttention 1 (Triton: INT8 QKᵀ with per-block scales and K smoothing, f16 P·V)."""
    target = _install(wheels, "sageattention-1*.whl", "sageattention")
    if target not in sys.path:
        sys.path.insert(0, target)
    return importlib.import_module("sageattention").sageattn
