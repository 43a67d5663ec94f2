"""smile_ray: SMILE upscaling (Sparse MIxture of Low-rank Experts, arXiv 2408.10174), swept on Ray Tune."""
from smile_ray.errors import SmileError

__all__ = ["SmileError", "SmileLinear", "SvdCache", "individual", "parameter_report", "projection_merge",
           "simple_average", "task_arithmetic", "upscale"]
__version__ = "0.1.0"


def __getattr__(name: str):
    """The method's names load torch on first use, not with every smile_ray module (validation, the driver)."""
    if name in __all__:
        import smile_ray.smile

        return getattr(smile_ray.smile, name)
    raise AttributeError(f"module 'smile_ray' has no attribute {name!r}")
