# The Azure SDK for Python against VAULT_URL, as a key orchestrator would use it (through
# whatever HTTPS_PROXY the environment names): a secret set and read back, an RSA key created
# and read. Challenge-resource verification stays on. Prints one line per result.
import sys, time
from azure.core.credentials import AccessToken
from azure.keyvault.keys import KeyClient
from azure.keyvault.secrets import SecretClient

class StaticToken:
    """Stands in for Entra ID: the vault stand-in accepts this token."""
    def get_token(self, *scopes, **kwargs):
        return AccessToken("test-token", int(time.time()) + 3600)

vault = sys.argv[1]
secrets = SecretClient(vault, StaticToken())
secrets.set_secret("db-password", "hunter2-through-connect")
print("secret", secrets.get_secret("db-password").value)
keys = KeyClient(vault, StaticToken())
created = keys.create_rsa_key("kek", size=2048)
print("key", created.name, keys.get_key("kek").key_type.value)
