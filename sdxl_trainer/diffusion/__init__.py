"""Diffusion math for SDXL training and sampling: pure functions on tensors (torch, math, numpy only).

Notation: x = x0 + σ·ε (σ-space), ᾱ = 1/(1 + σ²), SNR = 1/σ²; flow: x_t = (1 − t)·x0 + t·ε.
The math, the choices and the equations cited by every docstring: docs/diffusion.md.

Public API
----------
schedules
    scaled_linear_betas, alpha_bar_from_betas, betas_from_alpha_bar, sigma_from_alpha_bar,
    alpha_bar_from_sigma, snr_from_sigma, log_snr_from_sigma    — the discrete-schedule algebra
    sdxl_alpha_bar, sdxl_sigmas, SDXL_BETA_START, SDXL_BETA_END, SDXL_NUM_TIMESTEPS — SDXL's table (σ_max 14.6)
    rescale_zero_terminal_snr                                  — Lin et al.'s ᾱ_T = 0 rescale
    with_terminal_sigma, zero_snr_sigmas, NOVELAI_SIGMA_MAX    — NovelAI's finite high-σ terminal (20000)
    check_sigma_table, sigma_to_t, t_to_sigma                  — σ ↔ UNet timestep (log-linear, clamped)
    karras_sigmas, trailing_timesteps, trailing_sigmas, uniform_sigmas — sampling schedules
    beta_sigmas, beta_flow_times, beta_ppf — the "beta" schedule (ComfyUI's; beta_schedule.py)
    flow_shift, flow_times, flow_sigma, flow_log_snr           — rectified-flow time shift, schedule, σ view
    schedule_curves -> [ScheduleCurve]                         — σ(u), log-SNR(u) for the schedule plots
    sigma_max_for_resolution, mean_signal_fraction             — high-resolution coherence
objectives
    build_objective(name) -> Objective; OBJECTIVES             — "eps" | "v" | "v_ztsnr" | "flow"
    make_training_inputs -> TrainingInputs(noisy, timestep, target, info: LevelInfo)
    eps_training_inputs, v_training_inputs, flow_training_inputs — per-objective (x0, ε, level) → inputs
    output_to_x0_eps, eps_to_x0_eps, v_to_x0_eps, flow_to_x0_eps — model output → (x0, ε)
    c_in, c_noise_share, c_skip_v, c_out_v, c_skip_eps, c_out_eps — σ-space preconditioning (σ_data = 1)
    discrete_denoiser, flow_denoiser, FLOW_TIMESTEP_SCALE      — UNet → x0 denoiser for the samplers
timesteps
    build_level_sampler, uniform_timesteps, logit_normal_times, terminal_probability
weights
    build_loss_weight, WEIGHTINGS, MIN_SNR_FORMS, min_snr_eps, min_snr_v, min_snr_v_plus_one,
    min_snr_flow, min_snr_flow_hang, weighted_mse               — per-sample loss weights
    offset_noise, perturb_input_noise, build_noise_sampler     — training noise
samplers
    sample_euler, sample_euler_ancestral, sample_dpmpp_2m, sample_flow_euler, get_sampler, SAMPLERS,
    ancestral_step, prior_noise, preview_collector
guidance
    cfg, rescale_cfg, cfg_rescaled, pag, guided_denoiser, GUIDANCE_SPACES

Training step (no host synchronisation anywhere on this path)::

    objective = build_objective("v_ztsnr").to(device)
    sample_level = build_level_sampler(objective, terminal_oversample=0.0)
    sample_noise = build_noise_sampler(offset=0.0, perturbation=0.0)
    loss_weight = build_loss_weight(objective, kind="min_snr", gamma=5.0)
    ...
    sigma = sample_level(batch_size, generator=gen)            # gen lives on `device`
    noise, input_noise = sample_noise(x0, generator=gen)
    noisy, timestep, target, info = make_training_inputs(x0, noise, sigma, objective=objective,
                                                         input_noise=input_noise)
    loss = weighted_mse(unet(noisy, timestep, ...), target, loss_weight(info, external=tag_weight))

Sampling::

    denoiser = objective.denoiser(lambda x, t, **kw: unet(x, t, **kw).sample, dtype=torch.bfloat16)
    sigmas = karras_sigmas(28, sigma_min=objective.sigma_min, sigma_max=objective.sigma_max)
    x = prior_noise(shape, sigma_max=objective.sigma_max, generator=gen)
    x = sample_dpmpp_2m(guided_denoiser(denoiser, scale=5.0, phi=0.7), x, sigmas,
                        extra_args={"cond": {...}, "uncond": {...}}, callback=cb)
"""

from .beta_schedule import beta_flow_times, beta_ppf, beta_sigmas
from .guidance import GUIDANCE_SPACES, cfg, cfg_rescaled, guided_denoiser, pag, rescale_cfg
from .objectives import (
    FLOW_TIMESTEP_SCALE,
    OBJECTIVES,
    LevelInfo,
    Objective,
    TrainingInputs,
    build_objective,
    c_in,
    c_noise_share,
    c_out_eps,
    c_out_v,
    c_skip_eps,
    c_skip_v,
    discrete_denoiser,
    eps_to_x0_eps,
    eps_training_inputs,
    flow_denoiser,
    flow_to_x0_eps,
    flow_training_inputs,
    make_training_inputs,
    output_to_x0_eps,
    v_to_x0_eps,
    v_training_inputs,
)
from .samplers import (
    SAMPLERS,
    ancestral_step,
    get_sampler,
    preview_collector,
    prior_noise,
    sample_dpmpp_2m,
    sample_euler,
    sample_euler_ancestral,
    sample_flow_euler,
)
from .schedules import (
    NOVELAI_SIGMA_MAX,
    SDXL_BETA_END,
    SDXL_BETA_START,
    SDXL_NUM_TIMESTEPS,
    alpha_bar_from_betas,
    alpha_bar_from_sigma,
    betas_from_alpha_bar,
    check_sigma_table,
    ScheduleCurve,
    flow_log_snr,
    flow_shift,
    flow_sigma,
    flow_times,
    karras_sigmas,
    log_snr_from_sigma,
    mean_signal_fraction,
    rescale_zero_terminal_snr,
    scaled_linear_betas,
    sdxl_alpha_bar,
    schedule_curves,
    sdxl_sigmas,
    sigma_from_alpha_bar,
    sigma_max_for_resolution,
    sigma_to_t,
    snr_from_sigma,
    t_to_sigma,
    trailing_sigmas,
    trailing_timesteps,
    uniform_sigmas,
    with_terminal_sigma,
    zero_snr_sigmas,
)
from .timesteps import build_level_sampler, logit_normal_times, terminal_probability, uniform_timesteps
from .weights import (
    MIN_SNR_FORMS,
    WEIGHTINGS,
    build_loss_weight,
    build_noise_sampler,
    min_snr_eps,
    min_snr_flow,
    min_snr_flow_hang,
    min_snr_v,
    min_snr_v_plus_one,
    offset_noise,
    perturb_input_noise,
    weighted_mse,
)

__all__ = [
    "beta_flow_times",
    "beta_ppf",
    "beta_sigmas",
    "FLOW_TIMESTEP_SCALE",
    "GUIDANCE_SPACES",
    "LevelInfo",
    "MIN_SNR_FORMS",
    "NOVELAI_SIGMA_MAX",
    "OBJECTIVES",
    "Objective",
    "SAMPLERS",
    "SDXL_BETA_END",
    "SDXL_BETA_START",
    "SDXL_NUM_TIMESTEPS",
    "ScheduleCurve",
    "TrainingInputs",
    "WEIGHTINGS",
    "alpha_bar_from_betas",
    "alpha_bar_from_sigma",
    "ancestral_step",
    "betas_from_alpha_bar",
    "build_level_sampler",
    "build_loss_weight",
    "build_noise_sampler",
    "build_objective",
    "c_in",
    "c_noise_share",
    "c_out_eps",
    "c_out_v",
    "c_skip_eps",
    "c_skip_v",
    "cfg",
    "cfg_rescaled",
    "check_sigma_table",
    "discrete_denoiser",
    "eps_to_x0_eps",
    "eps_training_inputs",
    "flow_denoiser",
    "flow_log_snr",
    "flow_shift",
    "flow_sigma",
    "flow_times",
    "flow_to_x0_eps",
    "flow_training_inputs",
    "get_sampler",
    "guided_denoiser",
    "karras_sigmas",
    "log_snr_from_sigma",
    "logit_normal_times",
    "make_training_inputs",
    "mean_signal_fraction",
    "min_snr_eps",
    "min_snr_flow",
    "min_snr_flow_hang",
    "min_snr_v",
    "min_snr_v_plus_one",
    "offset_noise",
    "output_to_x0_eps",
    "pag",
    "perturb_input_noise",
    "preview_collector",
    "prior_noise",
    "rescale_cfg",
    "rescale_zero_terminal_snr",
    "sample_dpmpp_2m",
    "sample_euler",
    "sample_euler_ancestral",
    "sample_flow_euler",
    "scaled_linear_betas",
    "schedule_curves",
    "sdxl_alpha_bar",
    "sdxl_sigmas",
    "sigma_from_alpha_bar",
    "sigma_max_for_resolution",
    "sigma_to_t",
    "snr_from_sigma",
    "t_to_sigma",
    "terminal_probability",
    "trailing_sigmas",
    "trailing_timesteps",
    "uniform_sigmas",
    "uniform_timesteps",
    "v_to_x0_eps",
    "v_training_inputs",
    "weighted_mse",
    "with_terminal_sigma",
    "zero_snr_sigmas",
]
