-- Settles a batch of requests at once: `ARGV` is `now requests`, then per request `tokens cost
-- subjects` and per subject of it `key-index ask-tokens ask-cost budget lease reserved-minute
-- period` (`period`: the budget period it was settled in), with `KEYS` each subject's hash
-- once. Each hash is read and written once for all its entries, and its leases are checked and
-- removed with one call each: what costs Redis is the number of `redis.call`s (about 2 µs each)
-- and the arguments Lua reads.
--
-- Idempotent: an entry counts only if its lease is still in `<hash>:leases`, and removes it.
-- Sent again (a batch that failed or timed out may have run), or after its lease expired (a
-- reserve then charged its reserved cost), it changes nothing, so a failed batch can be retried.
local now = tonumber(ARGV[1])
local nreq = tonumber(ARGV[2])
local minute = math.floor(now / 60)
-- Sums of pico-dollars are exact in Lua's doubles below 2^53; from there, one HINCRBY each.
local EXACT = 9007199254740992
local by = {}
local c = 3
for r = 1, nreq do
  local rb, ns = c, tonumber(ARGV[c+2])
  c = c + 3
  for i = 1, ns do
    local ki = tonumber(ARGV[c])
    by[ki] = by[ki] or {}
    table.insert(by[ki], {c, rb})
    c = c + 7
  end
end
for ki, list in pairs(by) do
  local k = KEYS[ki]
  local lk = k .. ':leases'
  -- Which of the entries' leases are still held (each counts once, and is removed).
  local members, first = {}, {}
  for j, e in ipairs(list) do
    local b = e[1]
    local held = ARGV[b+3] == '1' and ARGV[b+2] or '0'
    members[j] = ARGV[b+4] .. '|' .. held
  end
  local live = {}
  if #members == 1 then
    -- One entry (every batch of an idle replica): ZREM alone says whether it was live.
    live[1] = redis.call('ZREM', lk, members[1]) == 1
  else
    local scores = redis.call('ZMSCORE', lk, unpack(members))
    local gone = {}
    for j, score in ipairs(scores) do
      if score and not first[members[j]] then
        first[members[j]] = true
        live[j] = true
        table.insert(gone, members[j])
      end
    end
    if #gone > 0 then redis.call('ZREM', lk, unpack(gone)) end
  end
  -- Only entries whose lease was live count. A settlement whose lease is gone changes
  -- nothing: it was settled already (a batch sent again after a failure that had in fact
  -- run), or its lease expired and a reserve charged its reserved cost as spent.
  local kept = {}
  for j, e in ipairs(list) do
    if live[j] then table.insert(kept, e) end
  end
  list = kept
  if #list > 0 then
    local h = redis.call('HMGET', k, 'minute', 'tokens', 'inflight', 'period')
    local m, t, inflight = tonumber(h[1]), tonumber(h[2]) or 0, tonumber(h[3]) or 0
    -- The latest budget period of the batch's entries. When it is newer than the hash's, the
    -- hash starts it (spend 0), and spend settled in a period that had ended is left out: one
    -- request at a time, it went to the old period, which the new one then reset (and the
    -- replica's own counters count it there too).
    local period = -1
    for _, e in ipairs(list) do
      if ARGV[e[1]+3] == '1' then period = math.max(period, tonumber(ARGV[e[1]+6])) end
    end
    local reset = h[1] and (tonumber(h[4]) or -1) < period
    local function spent(b) return not reset or tonumber(ARGV[b+6]) == period end
    local budget, give, spend = false, 0, 0
    for _, e in ipairs(list) do
      local b, rb = e[1], e[2]
      if m == tonumber(ARGV[b+5]) then
        t = t + tonumber(ARGV[rb]) - tonumber(ARGV[b+1])
      elseif m == minute then
        t = t + tonumber(ARGV[rb])
      end
      inflight = math.max(inflight - 1, 0)
      if ARGV[b+3] == '1' then
        budget = true
        give = give + tonumber(ARGV[b+2])
        if spent(b) then spend = spend + tonumber(ARGV[rb+1]) end
      end
    end
    if h[1] then
      if reset then
        -- A new budget period began while the requests ran: their spend counts in the new one
        -- (as the replica's own counters count it), not in the old one about to be reset.
        redis.call('HSET', k, 'tokens', t, 'inflight', inflight, 'period', period, 'spend', 0)
      else
        redis.call('HSET', k, 'tokens', t, 'inflight', inflight)
      end
    end
    if budget and give < EXACT and spend < EXACT then
      if give > 0 and redis.call('HINCRBY', k, 'reserved', string.format('%.0f', -give)) < 0 then
        redis.call('HSET', k, 'reserved', 0)
      end
      if spend > 0 then redis.call('HINCRBY', k, 'spend', string.format('%.0f', spend)) end
    elseif budget then
      for _, e in ipairs(list) do
        local b, rb = e[1], e[2]
        if ARGV[b+3] == '1' then
          -- ('-0' is not an integer to Redis: a reservation of nothing has nothing to give back.)
          if ARGV[b+2] ~= '0' and
              redis.call('HINCRBY', k, 'reserved', '-' .. ARGV[b+2]) < 0 then
            redis.call('HSET', k, 'reserved', 0)
          end
          if spent(b) then redis.call('HINCRBY', k, 'spend', ARGV[rb+1]) end
        end
      end
    end
  end
end
return 0
