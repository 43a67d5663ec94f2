"""smile_ray: SMILE upscaling (Sparse MIxture of Low-rank Experts, arXiv 2408.10174), swept on Ray Tune."""
from smile_ray.errors import SmileError
from smile_ray.smile import (SmileLinear, SvdCache, individual, parameter_report, projection_merge, simple_average,
                             task_arithmetic, upscale)

__all__ = ["SmileError", "SmileLinear", "SvdCache", "individual", "parameter_report", "projection_merge",
           "simple_average", "task_arithmetic", "upscale"]
__version__ = "0.1.0"
