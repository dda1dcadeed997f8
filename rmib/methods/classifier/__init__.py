"""The stage-1 "lesion / healthy" classifier of the RMIB paper (`rmib pretrain`)."""
