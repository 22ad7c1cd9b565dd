"""Eigen Attention: low-rank bases from calibration data, folded into attention weights."""
