"""Apiframe (v2): no push channel, so jobs are polled (`GET /v2/jobs/{id}`) and discovered (`GET /v2/jobs`)."""
