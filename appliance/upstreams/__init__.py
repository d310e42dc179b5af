"""Upstreams beyond one engine URL: data zones (box, district, cloud), the chain of upstreams each
model may use, and pools of engine URLs behind one upstream."""
