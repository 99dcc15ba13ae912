"""Who a caller is: identities, JWT verification, JWKS."""
