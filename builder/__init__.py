"""The policy engine builder: manifest -> validated policies -> generated Bazel package."""
