"""The fused local-global U-Net of Yan et al. (ISBI 2019)."""
