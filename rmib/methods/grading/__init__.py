"""The patch-grid DR grader of Yang et al. (MICCAI 2017): its export (`export`)."""
