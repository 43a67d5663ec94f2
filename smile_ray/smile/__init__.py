"""The SMILE method and the merges it is compared with; pure torch (no Ray, no MLflow)."""
from smile_ray.smile.baselines import individual, simple_average, task_arithmetic
from smile_ray.smile.layer import SmileLinear
from smile_ray.smile.params import count_parameters, parameter_report
from smile_ray.smile.projection import projection_merge
from smile_ray.smile.svd import SvdCache, svd_call_count, truncated_svd
from smile_ray.smile.upscale import UpscaleInfo, upscale

__all__ = ["SmileLinear", "SvdCache", "UpscaleInfo", "count_parameters", "individual", "parameter_report",
           "projection_merge", "simple_average", "svd_call_count", "task_arithmetic", "truncated_svd", "upscale"]
