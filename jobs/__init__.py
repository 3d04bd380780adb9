"""Job lifecycle: finding scans, labels, batching, progress, metrics, reports and export."""
