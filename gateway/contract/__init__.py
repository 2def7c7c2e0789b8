"""The MQTT contract (topics, payload models, JSON Schemas) shared by edge and server."""
