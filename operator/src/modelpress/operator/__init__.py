"""The ModelPress operator: turns CompressionJob resources into runner Jobs and mirrors their state.

kopf handlers stay thin; the CRD, the Job manifest and the status are built by pure functions in
`crd`, `job_builder` and `status`, so nearly everything is tested without an API server. Nothing here
imports torch: the operator image carries only kopf, the Kubernetes client and `modelpress.contract`.
"""
