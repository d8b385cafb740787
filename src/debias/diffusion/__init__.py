"""Diffusion math: noise schedules, prediction targets, loss weightings and losses."""
