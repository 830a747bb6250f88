using System.Threading.Channels;
using Akka.Actor;

namespace Distributed.Cluster;

/// <summary>Subscribes to the coordinator's job events and hands them to non-actor code through a channel.</summary>
/// The subscription is renewed every 2 s: a coordinator restarted from its journal does not remember its subscribers.
public sealed class JobMonitor : ReceiveActor, IWithTimers
{
    sealed record Renew;

    public ITimerScheduler Timers { get; set; } = null!;

    public JobMonitor(IActorRef coordinator, ChannelWriter<JobEvent> events)
    {
        Receive<JobEvent>(e => events.TryWrite(e));
        Receive<Renew>(_ => coordinator.Tell(new SubscribeToJob(Self)));
    }

    protected override void PreStart() => Timers.StartPeriodicTimer("renew", new Renew(), TimeSpan.Zero, TimeSpan.FromSeconds(2));
}

public static class JobEvents
{
    /// <summary>The coordinator's job events, readable outside the actor system.</summary>
    public static ChannelReader<JobEvent> Subscribe(ActorSystem system, IActorRef coordinator)
    {
        var channel = Channel.CreateUnbounded<JobEvent>(new UnboundedChannelOptions { SingleReader = true });
        system.ActorOf(Props.Create(() => new JobMonitor(coordinator, channel.Writer)), "job-monitor");
        return channel.Reader;
    }
}
