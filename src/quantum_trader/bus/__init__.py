"""The stream bus: connection (embedded Valkey or a configured Redis), consumer groups, trimming."""
