-- One hash per subject: `minute requests tokens inflight` (the rate window), `period spend`
-- (the budget) and `reserved` (cost held by requests in flight). Its leases, in the sorted set
-- `<hash>:leases`, are members `<lease id>|<reserved cost>` scored by their deadline. Counters
-- that stay small are computed here and written back with one HSET; the pico-dollar sums
-- (`spend`, `reserved`), which can pass 2^53, change only by HINCRBY, of a batch's sum while Lua
-- sums it exactly (below 2^53) and of each exact string from there; a reserve writes `spend`
-- back only as the string it read, `0` or the seed. Costs sent to the scripts are capped at
-- MAX_COST (mod.rs), so no HINCRBY can overflow.
--
-- Reserves for a batch of requests at once: `ARGV` is `now keys requests`, then per subject
-- (each of `KEYS`, once) `rpm tpm max-parallel budget-max period seed-spend` (`-1` for no
-- limit), then per request `lease deadline subjects` and per subject of it `key-index
-- ask-tokens ask-cost`. Requests are admitted in order, each by all its limits or by none,
-- against counters read once per hash and written back once, with one `ZADD` of all the hash's
-- new leases. Returns four numbers per request: `0 0 requests tokens` (its last subject's
-- counts, for the key's headers) when admitted, `subject reason 0 0` when refused (reason 1
-- rpm, 2 tpm, 3 in flight, 4 budget). Lua's work per argument is what costs once the commands
-- are few, so what is the same for every request of a subject is sent once.
local now = tonumber(ARGV[1])
local nkeys = tonumber(ARGV[2])
local nreq = tonumber(ARGV[3])
local minute = math.floor(now / 60)
local EXACT = 9007199254740992
local FIELDS = {'minute', 'requests', 'tokens', 'inflight', 'period', 'spend', 'reserved'}
local st = {}
for ki = 1, nkeys do
  local b = 3 + (ki - 1) * 6
  local k = KEYS[ki]
  local lim = function(v) if v == '-1' then return nil end return tonumber(v) end
  -- End the leases of requests whose replica died (or whose settlement never arrived): their
  -- slots come back, and their reserved cost is charged as spent (below).
  local lk = k .. ':leases'
  local expired = redis.call('ZRANGEBYSCORE', lk, '-inf', now)
  local charges = {}
  for _, id in ipairs(expired) do
    if redis.call('HINCRBY', k, 'inflight', -1) < 0 then redis.call('HSET', k, 'inflight', 0) end
    local sep = string.find(id, '|', 1, true)
    local c
    if sep then
      c = string.sub(id, sep + 1)
    else
      -- A lease of an older release, its cost in a hash of its own.
      c = redis.call('HGET', k .. ':lease-cost', id)
      redis.call('HDEL', k .. ':lease-cost', id)
    end
    if c and c ~= '0' then
      if redis.call('HINCRBY', k, 'reserved', '-' .. c) < 0 then
        redis.call('HSET', k, 'reserved', 0)
      end
      table.insert(charges, c)
    end
  end
  if #expired > 0 then redis.call('ZREMRANGEBYSCORE', lk, '-inf', now) end
  local h = redis.call('HMGET', k, unpack(FIELDS))
  local s = {k = k, rpm = lim(ARGV[b+1]), tpm = lim(ARGV[b+2]), par = lim(ARGV[b+3]),
    bmax = lim(ARGV[b+4]), requests = tonumber(h[2]) or 0, tokens = tonumber(h[3]) or 0,
    inflight = tonumber(h[4]) or 0, period = h[5], spend = h[6] or '0',
    reserved = tonumber(h[7]) or 0, add = 0, adds = {}, leases = {}}
  local period = ARGV[b+5]
  local fresh = false
  if not h[1] then
    -- A new hash, or a Redis that lost its data: the spend this replica knows.
    s.period, s.spend, fresh = period, ARGV[b+6], true
  else
    if tonumber(h[1]) ~= minute then s.requests, s.tokens = 0, 0 end
    -- Periods only move forward: a replica whose clock is a little behind at the boundary
    -- counts in the period already begun rather than resetting it.
    if s.bmax and (tonumber(h[5]) or -1) < tonumber(period) then
      s.period, s.spend, fresh = period, '0', true
    end
  end
  if s.bmax and #charges > 0 then
    -- An expired lease's request may have run upstream and been billed: its reserved cost
    -- counts as spent, in the period now (as a late settlement would), exactly (one HINCRBY
    -- each, of its string). The hash's period is written first, so that a later reserve
    -- doesn't reset it, or seed it again, over the charge.
    if fresh then
      redis.call('HSET', k, 'minute', h[1] or minute, 'period', s.period, 'spend', s.spend)
    end
    for _, c in ipairs(charges) do redis.call('HINCRBY', k, 'spend', c) end
    s.spend = redis.call('HGET', k, 'spend')
  end
  st[ki] = s
end
local out = {}
local c = 4 + nkeys * 6
for r = 1, nreq do
  local lease, deadline, ns = ARGV[c], ARGV[c+1], tonumber(ARGV[c+2])
  local first = c + 3
  c = first + ns * 3
  local which, why = 0, 0
  for i = 1, ns do
    local s = st[tonumber(ARGV[first + (i - 1) * 3])]
    if s.rpm and s.requests >= s.rpm then why = 1
    elseif s.tpm and s.tokens >= s.tpm then why = 2
    elseif s.par and s.inflight >= s.par then why = 3
    elseif s.bmax and tonumber(s.spend) + s.reserved >= s.bmax then why = 4
    end
    if why > 0 then which = i; break end
  end
  if which > 0 then
    table.insert(out, which); table.insert(out, why); table.insert(out, 0); table.insert(out, 0)
  else
    local s
    for i = 1, ns do
      local b = first + (i - 1) * 3
      s = st[tonumber(ARGV[b])]
      s.requests = s.requests + 1
      s.tokens = s.tokens + tonumber(ARGV[b+1])
      s.inflight = s.inflight + 1
      local cost = '0'
      if s.bmax then
        cost = ARGV[b+2]
        local v = tonumber(cost)
        s.reserved = s.reserved + v
        s.add = s.add + v
        table.insert(s.adds, cost)
      end
      table.insert(s.leases, deadline)
      table.insert(s.leases, lease .. '|' .. cost)
    end
    table.insert(out, 0); table.insert(out, 0)
    table.insert(out, s.requests); table.insert(out, s.tokens)
  end
end
for _, s in ipairs(st) do
  if #s.leases > 0 then
    if s.bmax then
      redis.call('HSET', s.k, 'minute', minute, 'requests', s.requests, 'tokens', s.tokens,
        'inflight', s.inflight, 'period', s.period, 'spend', s.spend)
      if s.add >= EXACT then
        -- From 2^53 Lua's sum is not exact: one increment each, from the exact strings.
        for _, cost in ipairs(s.adds) do redis.call('HINCRBY', s.k, 'reserved', cost) end
      elseif s.add > 0 then
        redis.call('HINCRBY', s.k, 'reserved', string.format('%.0f', s.add))
      end
    else
      redis.call('HSET', s.k, 'minute', minute, 'requests', s.requests, 'tokens', s.tokens,
        'inflight', s.inflight)
    end
    redis.call('ZADD', s.k .. ':leases', unpack(s.leases))
  end
end
return out
